"""Prompt formats, and records turned into token ids with loss-masked labels in one of them.

``alpaca`` is the Stanford Alpaca prompt, here; ``chat`` the tokenizer's own chat template
(:mod:`fedlora.data.chat`), the only one that renders conversations. For an Alpaca example the
prompt and the response are tokenised separately and concatenated, so the labels mask exactly
the prompt tokens (tokenising the joined text can merge tokens across the border). Only the
response and the EOS that ends it are learned; everything before carries -100.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.data.chat import ChatEncoder, has_chat_template
from fedlora.data.examples import IGNORE_INDEX, TokenizedExample, exchange_example
from fedlora.data.records import AnyRecord, Conversation, DataError, Record
from fedlora.models import ModelError

#: the formats ``prompt_format`` names; None there picks one (:func:`resolve_prompt_format`)
PROMPT_FORMATS = ("alpaca", "chat")

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
#: the cue the model answers after; truncation never cuts it (see exchange_example)
RESPONSE_HEADER = "### Response:\n"


@dataclass(frozen=True)
class TokenizationStats:
    examples: int
    #: examples cut to max_length
    truncated: int
    #: of those, examples whose prompt (not just the response) was cut
    prompt_truncated: int
    #: conversation turns left out whole to fit max_length
    dropped_turns: int


def resolve_prompt_format(requested: str | None, tokenizer) -> str:
    """``requested``, or where it is None ``chat`` for a tokenizer with a chat template and
    ``alpaca`` for one without."""
    if requested is not None:
        return requested
    return "chat" if has_chat_template(tokenizer) else "alpaca"


def format_prompt(record: Record) -> str:
    """The Alpaca prompt for a record, ending with ``### Response:\\n``."""
    if record.input.strip():
        return PROMPT_WITH_INPUT.format(instruction=record.instruction, input=record.input)
    return PROMPT_NO_INPUT.format(instruction=record.instruction)


def tokenize_record(tokenizer, record: AnyRecord, max_length: int, *,
                    prompt_format: str = "alpaca") -> TokenizedExample:
    """The record in ``prompt_format``, labelled on what the model answers, cut to ``max_length``.

    ``alpaca``: ``[BOS] prompt response EOS`` with the prompt masked; a sequence too long is
    cut by :func:`~fedlora.data.examples.exchange_example` (the ``### Response:`` cue stays).
    ``chat``: see :mod:`fedlora.data.chat`. Every example keeps at least one labelled token
    and none is dropped.
    """
    return _encoder(tokenizer, max_length, prompt_format, [record]).encode(record)[0]


@dataclass(frozen=True)
class GenerationPrompt:
    """A held-out record as a model is asked it: the tokens up to where its answer starts, as
    training renders them, and the answer it should give."""

    prompt_ids: list[int]
    reference: str


def generation_prompt(tokenizer, record: AnyRecord, max_length: int, *,
                      prompt_format: str = "alpaca") -> GenerationPrompt | None:
    """The record rendered whole as training renders it, up to where its last answer starts, and
    that answer's text (the response; a conversation's last assistant turn); None when that
    prompt alone is longer than ``max_length`` tokens."""
    example = tokenize_record(tokenizer, record, _UNCUT, prompt_format=prompt_format)
    labels = example.labels
    start = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX))
    if start > max_length:
        return None
    if isinstance(record, Conversation):
        answer = next(m.content for m in reversed(record.messages) if m.role == "assistant")
    else:
        answer = record.output
    return GenerationPrompt(example.input_ids[:start], answer)


#: a length no record reaches: the record rendered whole
_UNCUT = 1 << 30


def generation_prompts(tokenizer, records: Sequence[AnyRecord], max_length: int, limit: int, *,
                       prompt_format: str = "alpaca") -> tuple[list[GenerationPrompt], int]:
    """The first ``limit`` records whose prompt fits ``max_length``, as :class:`GenerationPrompt`,
    and how many records before the last one taken were passed over as too long."""
    prompts, skipped = [], 0
    for record in records:
        if len(prompts) == limit:
            break
        prompt = generation_prompt(tokenizer, record, max_length, prompt_format=prompt_format)
        if prompt is None:
            skipped += 1
        else:
            prompts.append(prompt)
    return prompts, skipped


def tokenize_records(tokenizer, records: Sequence[AnyRecord], max_length: int, *,
                     prompt_format: str = "alpaca") -> tuple[list[TokenizedExample], TokenizationStats]:
    """:func:`tokenize_record` over many records, counting what max_length cut."""
    encoder = _encoder(tokenizer, max_length, prompt_format, records)
    examples, prompt_truncated = [], 0
    for record in records:
        example, prompt_cut = encoder.encode(record)
        examples.append(example)
        prompt_truncated += prompt_cut
    truncated = sum(example.truncated for example in examples)
    dropped_turns = sum(example.dropped_turns for example in examples)
    return examples, TokenizationStats(len(examples), truncated, prompt_truncated, dropped_turns)


class LazyTokenizedRecords(Sequence[TokenizedExample]):
    """Records tokenised when accessed, and not kept.

    A client trains on a few batches per round, so tokenising its whole data set up front
    would cost more than its training; ``len`` (the example count aggregation weights use)
    needs no tokenisation at all. Keeping the token lists would cost several times the
    records' own memory (a Python int per token) for a saving of well under 1 ms per example.
    """

    def __init__(self, tokenizer, records: Sequence[AnyRecord], max_length: int, *,
                 prompt_format: str = "alpaca"):
        self._encoder = _encoder(tokenizer, max_length, prompt_format, records)
        self._records = records
        #: index of each truncated example tokenised so far -> the turns it dropped
        self._cut: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> TokenizedExample:  # type: ignore[override]
        example = self._encoder.encode(self._records[index])[0]
        if example.truncated:
            self._cut[index] = example.dropped_turns
        return example

    @property
    def truncated(self) -> int:
        """How many of the distinct examples tokenised so far were cut to max_length."""
        return len(self._cut)

    @property
    def dropped_turns(self) -> int:
        """Conversation turns those examples left out whole."""
        return sum(self._cut.values())


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids, attention_mask (1 on real tokens) and labels."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _encoder(tokenizer, max_length: int, prompt_format: str,
             records: Sequence[AnyRecord]) -> _AlpacaEncoder | ChatEncoder:
    """The encoder of ``prompt_format``, after checking it can render every record."""
    if prompt_format == "chat":
        return ChatEncoder(tokenizer, max_length)
    if prompt_format != "alpaca":
        raise ValueError(f"unknown prompt format {prompt_format!r} (expected one of {', '.join(PROMPT_FORMATS)})")
    conversations = sum(isinstance(record, Conversation) for record in records)
    if conversations:  # said before training starts, not at the first batch that holds one
        raise DataError("prompt_format 'alpaca'", f"cannot render the {conversations} conversation records: "
                                                  "use prompt_format 'chat' with a tokenizer that has a chat template")
    return _AlpacaEncoder(tokenizer, max_length)


class _AlpacaEncoder:
    """A tokenizer's fixed pieces (special prefix, response cue, EOS), worked out once."""

    def __init__(self, tokenizer, max_length: int):
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        if tokenizer.eos_token_id is None:
            raise ModelError(f"tokenizer {type(tokenizer).__name__} has no EOS token to end responses with")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prefix = _special_prefix(tokenizer)
        self.header = self.ids(RESPONSE_HEADER)
        self.eos = tokenizer.eos_token_id

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, record: Record) -> tuple[TokenizedExample, bool]:
        """The example, and whether its prompt was cut."""
        body = format_prompt(record).removesuffix(RESPONSE_HEADER)
        prompt = self.prefix + self.ids(body)
        response = self.ids(record.output) + [self.eos]
        return exchange_example(prompt, self.header, response, self.max_length)


def _special_prefix(tokenizer) -> list[int]:
    """The tokens (a BOS, if any) the tokenizer puts before a text when it adds its own."""
    probe = "Response"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []
