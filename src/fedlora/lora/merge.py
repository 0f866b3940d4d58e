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

A quantised linear (4-bit, int8) is never merged into: its updates go into the full-precision
residual beside it (:mod:`fedlora.lora.residual`), as factors, and need no carry.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from fedlora.aggregation.factors import GlobalUpdate, LoraFactors
from fedlora.lora.residual import PARTS, RESIDUAL, is_quantized, residual_of


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
    for module, factors in global_update.factors.items():
        residual = [global_update.residual[module]] if module in global_update.residual else []
        _merge(model, module, [factors, *residual], carry)
    residual_only = {name: f for name, f in global_update.residual.items() if name not in global_update.factors}
    return merge_factors(model, residual_only, carry)


def merge_factors(model: nn.Module, factors: dict[str, LoraFactors],
                  carry: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Add each module's ``scale * B @ A`` into its base weight (computed in float32), or into
    its residual where it is quantised; returns the carry."""
    carry = {} if carry is None else carry
    for module, update in factors.items():
        _merge(model, module, [update], carry)
    return carry


@contextmanager
def merged_for_now(model: nn.Module, factors: dict[str, LoraFactors] | None) -> Iterator[nn.Module]:
    """``model`` with ``factors`` merged in (a carry of their own), restored bit for bit on exit
    (:func:`merged_state`, by module name: whether a PEFT wrapper was added or removed meanwhile)."""
    if not factors:
        yield model
        return
    saved = merged_state(model, factors)
    try:
        merge_factors(model, factors, carry={})
        yield model
    finally:
        load_merged_state(model, saved)


def base_layer(model: nn.Module, module: str) -> nn.Linear:
    """The base Linear of ``module`` (quantised or not) in a plain or PEFT-wrapped model."""
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    try:
        layer = root.get_submodule(module)
    except AttributeError as error:
        raise ValueError(f"module {module!r} does not exist in {type(root).__name__}") from error
    if isinstance(layer, LoraLayer):
        layer = layer.get_base_layer()
    if not isinstance(layer, nn.Linear):  # bitsandbytes' quantised linears are nn.Linear subclasses
        raise ValueError(f"module {module!r} is a {type(layer).__name__}, not a Linear layer")
    return layer


def base_weight(model: nn.Module, module: str) -> Tensor:
    """The frozen base weight of ``module`` in a plain or PEFT-wrapped model."""
    return base_layer(model, module).weight


def module_shape(model: nn.Module, module: str) -> tuple[int, int]:
    """(d, n): the shape of ``module``'s dense update (a quantised weight's own shape is its packing's)."""
    layer = base_layer(model, module)
    return layer.out_features, layer.in_features


def merged_delta(model: nn.Module, pristine: nn.Module, module: str) -> Tensor:
    """All that was merged into ``module`` since ``pristine`` (the same model as loaded), as a dense
    float32 matrix: a quantised linear's residual, else the difference of the weights."""
    layer = base_layer(model, module)
    if is_quantized(layer):
        return residual_of(layer).delta()
    return layer.weight.float() - base_weight(pristine, module).float()


def merged_state(model: nn.Module, modules: Iterable[str]) -> dict[str, Tensor]:
    """What merges change in ``modules`` (besides the carry), as copies: a plain linear's weight
    under its module name, a quantised one's residual under ``<module>.merged_residual.<part>``."""
    state = {}
    for module in modules:
        layer = base_layer(model, module)
        if is_quantized(layer):
            state.update({f"{module}.{RESIDUAL}.{part}": tensor for part, tensor in residual_of(layer).state().items()})
        else:
            state[module] = layer.weight.detach().clone()
    return state


def load_merged_state(model: nn.Module, state: dict[str, Tensor]) -> set[str]:
    """Put a :func:`merged_state` back, bit for bit; returns the modules it holds."""
    residuals: dict[str, dict[str, Tensor]] = {}
    modules = set()
    with torch.no_grad():
        for key, tensor in state.items():
            module, _, part = key.rpartition(f".{RESIDUAL}.")
            if module and part in PARTS:
                residuals.setdefault(module, {})[part] = tensor
            else:
                module = key
                base_weight(model, module).copy_(tensor)
            modules.add(module)
    for module, parts in residuals.items():
        residual_of(base_layer(model, module)).load(parts)
    return modules


def _merge(model: nn.Module, module: str, updates: list[LoraFactors], carry: dict[str, Tensor]) -> None:
    """Add the sum of ``updates`` to ``module``: its residual where it is quantised, else its weight."""
    layer = base_layer(model, module)
    shape = (layer.out_features, layer.in_features)  # not the weight's: a quantised one's is its packing's
    for update in updates:
        if update.shape != shape:
            raise ValueError(f"module {module!r}: update shape {update.shape} does not match weight shape {shape}")
    with torch.no_grad():
        if is_quantized(layer):
            residual_of(layer).add(updates)
            return
        device = layer.weight.device
        delta = updates[0].delta(torch.float32, device)
        for update in updates[1:]:
            delta = delta + update.delta(torch.float32, device)
        _add_dense(layer.weight, module, delta, carry)


def _add_dense(weight: Tensor, module: str, delta: Tensor, carry: dict[str, Tensor]) -> None:
    if torch.finfo(weight.dtype).bits >= 32:  # full precision keeps the update: no carry needed
        weight.add_(delta.to(weight.dtype))
        return
    new = weight.float() + delta
    if module in carry:
        new += carry[module].to(new.device)  # a carry read from disk may still be on the CPU
    weight.copy_(new)  # copy_ rounds to the weight's dtype
    carry[module] = new - weight.float()
