"""Merging dense LoRA updates into a model's base weights, in place.

A half-precision weight cannot absorb an update much smaller than its own rounding step:
``bf16(W + d) == W`` when ``|d|`` is below half a unit in the last place of ``W`` (about
``|W| / 256`` for bfloat16), so a federation that merges a small update every round would
silently lose all of them. The merge therefore adds in float32 and keeps what rounding threw
away in a per-module ``carry`` (Kahan-style compensated summation)::

    new = W.float() + delta + carry[module]
    W  <- new rounded to W's dtype
    carry[module] = new - W.float()

The carry is added back next time, so the sum of all updates reaches the weights up to one
final rounding instead of being dropped update by update. Float32 weights need no carry.

The dense update is formed on the weight's device, wherever the factors come from (a Flower
message or a checkpoint arrives on the CPU): a GPU model merges on the GPU, and its carry
(float32, the size of the merged weights) lives there too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from fedlora.aggregation.factors import GlobalUpdate, LoraFactors


def merge_update(model: nn.Module, global_update: GlobalUpdate,
                 carry: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Merge into the base weights what ``global_update`` says belongs there; returns the carry.

    With ``global_update.merge`` (FLoRA and kin) that is the whole update, factors plus
    residual, after which clients start a fresh adapter. Without it the factors stay the global
    adapter and only the residual (FedEx-LoRA's exact correction) goes into the base.
    """
    if not global_update.merge:
        return merge_factors(model, global_update.residual, carry)
    carry = {} if carry is None else carry
    residual_only = {name: f for name, f in global_update.residual.items()
                     if name not in global_update.factors}
    with torch.no_grad():
        for module in global_update.factors:
            weight = base_weight(model, module)
            _add_dense(weight, module, global_update.delta(module, torch.float32, weight.device), carry)
    return merge_factors(model, residual_only, carry)


def merge_factors(model: nn.Module, factors: dict[str, LoraFactors],
                  carry: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Add each module's ``scale * B @ A`` (computed in float32) into its base weight; returns the carry."""
    carry = {} if carry is None else carry
    with torch.no_grad():
        for module, update in factors.items():
            weight = base_weight(model, module)
            _add_dense(weight, module, update.delta(torch.float32, weight.device), carry)
    return carry


@contextmanager
def merged_for_now(model: nn.Module, factors: dict[str, LoraFactors] | None) -> Iterator[nn.Module]:
    """``model`` with ``factors`` merged into its base weights (a carry of their own), restored bit
    for bit on exit, whatever wraps or unwraps the model meanwhile (the weights are kept by
    parameter)."""
    if not factors:
        yield model
        return
    saved = [(weight, weight.detach().clone()) for weight in (base_weight(model, name) for name in factors)]
    try:
        merge_factors(model, factors, carry={})
        yield model
    finally:
        with torch.no_grad():
            for weight, copy in saved:
                weight.copy_(copy)


def base_weight(model: nn.Module, module: str) -> Tensor:
    """The frozen base weight of ``module`` in a plain or PEFT-wrapped model."""
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    try:
        layer = root.get_submodule(module)
    except AttributeError as error:
        raise ValueError(f"module {module!r} does not exist in {type(root).__name__}") from error
    if isinstance(layer, LoraLayer):
        layer = layer.get_base_layer()
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"module {module!r} is a {type(layer).__name__}, not a Linear layer")
    return layer.weight


def _add_dense(weight: Tensor, module: str, delta: Tensor, carry: dict[str, Tensor]) -> None:
    if delta.shape != weight.shape:
        raise ValueError(f"module {module!r}: update shape {tuple(delta.shape)} does not match "
                         f"weight shape {tuple(weight.shape)}")
    if torch.finfo(weight.dtype).bits >= 32:  # full precision keeps the update: no carry needed
        weight.add_(delta.to(weight.dtype))
        return
    new = weight.float() + delta
    if module in carry:
        new += carry[module].to(new.device)  # a carry read from disk may still be on the CPU
    weight.copy_(new)  # copy_ rounds to the weight's dtype
    carry[module] = new - weight.float()
