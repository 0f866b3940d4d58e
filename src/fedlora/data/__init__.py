"""Training data: instruction records and conversations, prompt formats (Alpaca, the chat
template) and tokenisation, client splits, MMLU."""

from fedlora.data.examples import IGNORE_INDEX, TokenizedExample
from fedlora.data.mmlu import MMLUQuestion, load_mmlu, mmlu_prompt
from fedlora.data.partition import centralize, client_files, load_clients
from fedlora.data.prompts import (
    LazyTokenizedRecords,
    PROMPT_FORMATS,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    GenerationPrompt,
    TokenizationStats,
    collate,
    format_prompt,
    generation_prompts,
    resolve_prompt_format,
    tokenize_record,
    tokenize_records,
)
from fedlora.data.records import (
    AnyRecord,
    Conversation,
    DataError,
    LoadReport,
    Message,
    Record,
    load_records,
    load_records_with_report,
)
from fedlora.data.validation import hold_out, split_clients, validation_count

__all__ = [
    "IGNORE_INDEX", "PROMPT_FORMATS", "LazyTokenizedRecords", "PROMPT_NO_INPUT", "PROMPT_WITH_INPUT", "AnyRecord",
    "Conversation", "DataError", "GenerationPrompt", "LoadReport", "MMLUQuestion", "Message", "Record", "TokenizationStats",
    "TokenizedExample", "centralize", "client_files", "collate", "format_prompt", "generation_prompts", "hold_out", "load_clients",
    "load_mmlu", "load_records", "load_records_with_report", "mmlu_prompt", "resolve_prompt_format",
    "split_clients", "tokenize_record", "tokenize_records", "validation_count",
]
