"""A trainable core between a LoRA's frozen factors: RAVAN's heads, ``Σ_h s_h·B_h·H_h·A_h``.

PEFT's LoRA layer adds ``lora_B(lora_A(x)) * scaling``. :class:`CoredLinear` takes the place of
``lora_A``: a Linear whose weight is A (h heads of q rows, h·q the adapter's rank), followed by
the block-diagonal core ``diag(s_1·H_1, …, s_h·H_h)`` (H_h: q×q, s_h a scalar per head), so PEFT's
own forward computes ``scaling · B · blockdiag(s_h H_h) · A · x``. The core's parameters are H and
s; it reports ``s_h·H_h`` (what a RAVAN client uploads), and a core set into it starts at s = 1.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn


class CoredLinear(nn.Linear):
    """``x ↦ blockdiag(s_h H_h) · A · x`` with A the weight of the ``lora_A`` Linear it replaces."""

    def __init__(self, lora_A: nn.Linear, heads: int):
        rank = lora_A.out_features
        if rank % heads:
            raise ValueError(f"a core of {heads} heads needs a rank divisible by {heads}, got {rank}")
        weight = lora_A.weight
        super().__init__(lora_A.in_features, rank, bias=False, device="meta")
        self.weight = weight  # the same parameter: A
        size = rank // heads
        self.core = nn.Parameter(torch.zeros(heads, size, size, dtype=weight.dtype, device=weight.device))
        self.head_scale = nn.Parameter(torch.ones(heads, dtype=weight.dtype, device=weight.device))

    @property
    def heads(self) -> int:
        return self.core.shape[0]

    def scaled_core(self) -> Tensor:
        """``s_h·H_h`` for every head (h×q×q), differentiable in both."""
        return self.core * self.head_scale[:, None, None]

    def forward(self, x: Tensor) -> Tensor:
        projected = nn.functional.linear(x, self.weight).unflatten(-1, (self.heads, -1))
        return torch.einsum("...hq,hpq->...hp", projected, self.scaled_core()).flatten(-2)


def core_of(layer: LoraLayer, adapter_name: str) -> CoredLinear | None:
    """The layer's core for ``adapter_name``, None where it has none."""
    module = layer.lora_A[adapter_name]
    return module if isinstance(module, CoredLinear) else None


def set_core(layer: LoraLayer, adapter_name: str, H: Tensor) -> None:
    """Give the layer's adapter the core ``H`` (h×q×q), head scales 1, installing one if it has none."""
    core = core_of(layer, adapter_name)
    if core is None or core.heads != H.shape[0]:
        core = CoredLinear(layer.lora_A[adapter_name], heads=H.shape[0])
        layer.lora_A[adapter_name] = core
    if H.shape != core.core.shape:
        raise ValueError(f"core of shape {tuple(H.shape)} does not fit the adapter's {tuple(core.core.shape)}")
    with torch.no_grad():
        core.core.copy_(H)
        core.head_scale.fill_(1.0)
