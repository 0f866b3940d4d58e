"""Exporting a global model as a standard PEFT LoRA adapter.

A federation's merged updates are dense; :func:`low_rank_adapter` truncates one to the best
rank-r factors (Eckart–Young) and reports what was lost, and :func:`save_adapter` writes
factors in the layout ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from peft import PeftModel
from torch import Tensor, nn

from fedlora.aggregation.factors import LoraFactors
from fedlora.lora.adapters import attach_lora, remove_lora, set_factors


def low_rank_adapter(delta: Tensor, rank: int) -> tuple[LoraFactors, float]:
    """Best rank-``rank`` factors of ``delta`` (truncated SVD in float64) and the relative
    Frobenius error ``||delta - B@A|| / ||delta||`` of the truncation (0 for a zero delta).

    The singular values are split evenly, ``B = U sqrt(S)`` and ``A = sqrt(S) Vh``, so neither
    factor dominates; the scale is 1.
    """
    if delta.dim() != 2:
        raise ValueError(f"delta must be a matrix, got shape {tuple(delta.shape)}")
    if not 1 <= rank <= min(delta.shape):
        raise ValueError(f"rank {rank} must be between 1 and {min(delta.shape)} for a "
                         f"{tuple(delta.shape)} update")
    U, S, Vh = torch.linalg.svd(delta.detach().to(torch.float64), full_matrices=False)
    root = S[:rank].sqrt()
    factors = LoraFactors(A=(root[:, None] * Vh[:rank]).float(), B=(U[:, :rank] * root).float())
    total = S.square().sum()
    error = (S[rank:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return factors, error


def save_adapter(base_model: nn.Module, factors: dict[str, LoraFactors], rank: int, alpha: float,
                 target_modules: Iterable[str], out_dir: str | Path, *, base_name: str | None = None) -> Path:
    """Write ``factors`` as a PEFT adapter (adapter_model.safetensors + adapter_config.json).

    ``base_model`` is a plain transformers model; it is wrapped for the save and unwrapped
    again, so it leaves unchanged. Factors whose scale differs from ``alpha / rank`` are
    rescaled so the saved adapter applies the same update; a core H (RAVAN's) is folded into B, as
    PEFT's LoRA has none. ``base_name`` is the base as users
    know it (a Hub id), recorded as the adapter's ``base_model_name_or_path`` in place of the
    folder the model was loaded from.
    """
    if isinstance(base_model, PeftModel):
        raise ValueError("save_adapter needs the plain base model; call remove_lora on the PEFT model first")
    peft_model = attach_lora(base_model, rank, alpha, target_modules)
    try:
        set_factors(peft_model, {module: f.plain() for module, f in factors.items()})
        if base_name is not None:
            peft_model.peft_config["default"].base_model_name_or_path = base_name
        peft_model.save_pretrained(str(out_dir))
    finally:
        remove_lora(peft_model)
    return Path(out_dir)
