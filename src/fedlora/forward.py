"""A causal LM's forward on a :class:`~fedlora.data.batches.TokenBatch`: the LM head applied
only where a target is, the batch's summed NLL (training and evaluation share it), and the
eval mode every scoring pass runs in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fedlora.data.batches import TokenBatch


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; restores the previous train/eval mode after.

    Shared by every evaluator (:mod:`fedlora.eval`) and probe: a client may be evaluated
    mid-training and must come back in training mode (dropout on) exactly as it was.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def labelled_logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """(labelled positions, vocabulary) logits: the LM head applied only where a target is set."""
    return model(**batch.inputs, logits_to_keep=batch.labelled, use_cache=False).logits


def summed_nll(model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, int]:
    """(summed NLL, number of targets) of one batch, differentiable."""
    targets = batch.targets[batch.labelled]
    logits = labelled_logits(model, batch).float()  # float32 softmax even for bf16/fp16 models
    return nn.functional.cross_entropy(logits, targets, reduction="sum"), targets.numel()
