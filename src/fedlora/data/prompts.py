"""The Stanford Alpaca prompt, and records turned into token ids with loss-masked labels.

The prompt and the response are tokenised separately and concatenated, so the labels mask
exactly the prompt tokens (tokenising the joined text can merge tokens across the border).
Only the response and the EOS that ends it are learned; everything before carries -100.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from fedlora.data.examples import IGNORE_INDEX, TokenizedExample, exchange_example
from fedlora.data.records import Record
from fedlora.models import ModelError

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


def format_prompt(record: Record) -> str:
    """The Alpaca prompt for a record, ending with ``### Response:\\n``."""
    if record.input.strip():
        return PROMPT_WITH_INPUT.format(instruction=record.instruction, input=record.input)
    return PROMPT_NO_INPUT.format(instruction=record.instruction)


def tokenize_record(tokenizer, record: Record, max_length: int) -> TokenizedExample:
    """``[BOS] prompt response EOS`` with the prompt masked, cut to ``max_length`` tokens by
    :func:`~fedlora.data.examples.exchange_example` (the ``### Response:`` cue stays). Every
    example therefore keeps at least one labelled token and none is dropped.
    """
    return _Encoder(tokenizer, max_length).encode(record)[0]


def tokenize_records(tokenizer, records: Iterable[Record],
                     max_length: int) -> tuple[list[TokenizedExample], TokenizationStats]:
    """:func:`tokenize_record` over many records, counting the truncated ones."""
    encoder = _Encoder(tokenizer, max_length)
    examples, prompt_truncated = [], 0
    for record in records:
        example, prompt_cut = encoder.encode(record)
        examples.append(example)
        prompt_truncated += prompt_cut
    truncated = sum(example.truncated for example in examples)
    return examples, TokenizationStats(len(examples), truncated, prompt_truncated)


class LazyTokenizedRecords(Sequence[TokenizedExample]):
    """Records tokenised when accessed, and not kept.

    A client trains on a few batches per round, so tokenising its whole data set up front
    would cost more than its training; ``len`` (the example count aggregation weights use)
    needs no tokenisation at all. Keeping the token lists would cost several times the
    records' own memory (a Python int per token) for a saving of well under 1 ms per example.
    """

    def __init__(self, tokenizer, records: Sequence[Record], max_length: int):
        self._encoder = _Encoder(tokenizer, max_length)
        self._records = records
        self._truncated: set[int] = set()

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> TokenizedExample:  # type: ignore[override]
        example = self._encoder.encode(self._records[index])[0]
        if example.truncated:
            self._truncated.add(index)
        return example

    @property
    def truncated(self) -> int:
        """How many of the distinct examples tokenised so far were cut to max_length."""
        return len(self._truncated)


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


class _Encoder:
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
