"""Held-out loss and perplexity over the response tokens of instruction records.

The loss is the exact token-weighted mean NLL of the whole set: summed cross-entropy over
every response token divided by their count, so it does not depend on the batch size or on
how lengths fall into batches (a mean of batch means would). The LM head is applied only to
the positions that predict a response token (:func:`fedlora.forward.summed_nll`), and with ``packed``
a batch's sequences share one row without padding (:mod:`fedlora.data.batches`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from fedlora.data.batches import token_batch
from fedlora.data.prompts import TokenizedExample, tokenize_records
from fedlora.data.records import Record
from fedlora.forward import eval_mode, summed_nll
from fedlora.models import model_device, pad_token_id


def evaluate_loss(model: nn.Module, tokenizer, records: Sequence[Record], *, max_length: int = 512,
                  batch_size: int = 8, packed: bool = False) -> dict:
    """Mean response-token NLL of ``model`` on ``records``, and its perplexity.

    Tokenises the records once; a caller evaluating the same set every round should call
    :func:`tokenize_records` itself once and then :func:`evaluate_loss_tokenized`.
    """
    examples, _ = tokenize_records(tokenizer, records, max_length)
    return evaluate_loss_tokenized(model, examples, pad_token_id(tokenizer), batch_size=batch_size,
                                   packed=packed)


def evaluate_loss_tokenized(model: nn.Module, examples: Sequence[TokenizedExample], pad_id: int, *,
                            batch_size: int = 8, packed: bool = False) -> dict:
    """Like :func:`evaluate_loss`, on examples already made by :func:`tokenize_records`.

    Returns ``{"eval_loss", "perplexity", "eval_tokens"}``; with no response tokens at all the
    loss and perplexity are NaN and ``eval_tokens`` is 0. ``packed`` needs a model that computes
    packed sequences apart (:func:`fedlora.attention.enable_packing`).
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
            batch = token_batch([examples[i] for i in order[start:start + batch_size]], pad_id, packed=packed)
            nll, tokens = summed_nll(model, batch.to(device))
            total_nll += nll.item()
            total_tokens += tokens
    if total_tokens == 0:
        return {"eval_loss": math.nan, "perplexity": math.nan, "eval_tokens": 0}
    loss = total_nll / total_tokens
    return {"eval_loss": loss, "perplexity": math.exp(loss), "eval_tokens": total_tokens}
