"""Model batches whose loss reads only the positions that predict a label, packed or padded.

A :class:`TokenBatch` is the model's inputs plus ``targets``: at position t the label of
token t+1 of the same sequence, IGNORE_INDEX where there is none. The next-token shift is
done here, once, so the LM head need only be applied where a target is set.

:func:`packed_batch` lays a batch's sequences side by side in one row without padding: the
inputs of transformers' ``DataCollatorWithFlattening`` (position ids restarting at 0 for each
sequence, its boundaries as FlashAttention's varlen arguments ``cu_seq_lens_q``/``_k`` and
``max_length_q``/``_k``), on which a model that keeps the sequences apart (see
:mod:`fedlora.attention`) computes every sequence exactly as alone. :func:`padded_batch` is
the same batch right-padded with an attention mask, for a model that cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DataCollatorWithFlattening

from fedlora.data.examples import IGNORE_INDEX, TokenizedExample
from fedlora.data.prompts import collate

_FLATTEN = DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE_INDEX)


@dataclass(frozen=True)
class TokenBatch:
    #: keyword arguments of the model's forward
    inputs: dict[str, torch.Tensor | int]
    #: (rows, width): the label token t predicts, IGNORE_INDEX where it predicts none
    targets: torch.Tensor

    @property
    def labelled(self) -> torch.Tensor:
        """Where a target is set: the positions whose logits the loss reads."""
        return self.targets != IGNORE_INDEX

    def last_tokens(self) -> torch.Tensor:
        """Where each sequence's last token is, shaped like ``targets`` (in sequence order)."""
        last = torch.zeros_like(self.targets, dtype=torch.bool)
        if "cu_seq_lens_q" in self.inputs:
            last[0, self.inputs["cu_seq_lens_q"][1:].long() - 1] = True
        else:
            lengths = self.inputs["attention_mask"].sum(dim=1)
            last[torch.arange(len(lengths)), lengths - 1] = True
        return last

    def to(self, device: torch.device) -> TokenBatch:
        inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                  for key, value in self.inputs.items()}
        return TokenBatch(inputs, self.targets.to(device))


def packed_batch(examples: Sequence[TokenizedExample]) -> TokenBatch:
    """The examples in one row, no padding; position ids and varlen boundaries per example."""
    if not examples:
        raise ValueError("cannot pack an empty batch")
    flat = _FLATTEN([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    # the collator puts IGNORE_INDEX at every sequence start, so no target crosses a border
    return TokenBatch({key: value for key, value in flat.items() if key != "labels"},
                      _next_token(flat["labels"]))


def padded_batch(examples: Sequence[TokenizedExample], pad_token_id: int) -> TokenBatch:
    """The examples right-padded (:func:`~fedlora.data.prompts.collate`), with their targets."""
    batch = collate(examples, pad_token_id)
    return TokenBatch({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                      _next_token(batch["labels"]))


def token_batch(examples: Sequence[TokenizedExample], pad_token_id: int, *, packed: bool) -> TokenBatch:
    return packed_batch(examples) if packed else padded_batch(examples, pad_token_id)


def _next_token(labels: torch.Tensor) -> torch.Tensor:
    """Labels moved one position left: position t gets the label of t+1 (none for the last)."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
