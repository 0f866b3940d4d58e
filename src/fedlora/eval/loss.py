"""Held-out loss and perplexity over the response tokens of instruction records.

The loss is the exact token-weighted mean NLL of the whole set: summed cross-entropy over
every response token divided by their count, so it does not depend on the batch size or on
how lengths fall into batches (a mean of batch means would).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from fedlora.data.prompts import IGNORE_INDEX, TokenizedExample, collate, tokenize_records
from fedlora.data.records import Record
from fedlora.models import model_device, pad_token_id


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; restores the previous train/eval mode after.

    Shared by every evaluator in :mod:`fedlora.eval`: a client may be evaluated mid-training
    and must come back in training mode (dropout on) exactly as it was.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def evaluate_loss(model: nn.Module, tokenizer, records: Sequence[Record], *, max_length: int = 512,
                  batch_size: int = 8) -> dict:
    """Mean response-token NLL of ``model`` on ``records``, and its perplexity.

    Tokenises the records once; a caller evaluating the same set every round should call
    :func:`tokenize_records` itself once and then :func:`evaluate_loss_tokenized`.
    """
    examples, _ = tokenize_records(tokenizer, records, max_length)
    return evaluate_loss_tokenized(model, examples, pad_token_id(tokenizer), batch_size=batch_size)


def evaluate_loss_tokenized(model: nn.Module, examples: Sequence[TokenizedExample], pad_id: int, *,
                            batch_size: int = 8) -> dict:
    """Like :func:`evaluate_loss`, on examples already made by :func:`tokenize_records`.

    Returns ``{"eval_loss", "perplexity", "eval_tokens"}``; with no response tokens at all the
    loss and perplexity are NaN and ``eval_tokens`` is 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    device = model_device(model)
    # Similar lengths share a batch, so little compute goes to padding; the token-weighted
    # sum makes the order irrelevant to the result.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total_nll = 0.0
    total_tokens = 0
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id)
            nll, tokens = _summed_nll(model, {key: t.to(device) for key, t in batch.items()})
            total_nll += nll
            total_tokens += tokens
    if total_tokens == 0:
        return {"eval_loss": math.nan, "perplexity": math.nan, "eval_tokens": 0}
    loss = total_nll / total_tokens
    return {"eval_loss": loss, "perplexity": math.exp(loss), "eval_tokens": total_tokens}


def _summed_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(summed NLL, number of labelled tokens) of one batch; token t predicts label t+1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predicted = logits[:, :-1, :].float()  # float32 softmax even for bf16/fp16 models
    targets = batch["labels"][:, 1:]
    nll = nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]),
                                      targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                      reduction="sum")
    return nll.item(), int((targets != IGNORE_INDEX).sum())
