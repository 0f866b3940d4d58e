"""A client's PEFT AdaLoRA: SVD-form adapters P·Λ·Q whose rank budget moves between modules as it trains.

AdaLoRA (Zhang et al., ICLR 2023) parameterises each adapted weight's update as
``α/(r + 1e-5) · P · diag(Λ) · Q`` (PEFT: ``lora_B`` = P, d×r; ``lora_E`` = Λ, r; ``lora_A`` =
Q, r×n; r = ``init_r``) and, after every optimizer step, scores every triplet (P_i, λ_i, Q_i)
and zeroes the λ of the least important ones over all modules together, down to a budget that
falls on a cubic schedule from ``init_r`` to ``target_r`` per module on average
(``update_and_allocate``). What a client then holds per module is the triplets whose λ is not
zero: :func:`pruned_factors` gives them as LoRA factors (B = P, A = Λ·Q, rank = the triplets
kept, at least 1), so FLoRA stacks them as any other update. PEFT adds AdaLoRA's orthogonality
penalty only to a loss computed inside its forward; fedlora computes its loss outside, so the
same penalty is a plan's regulariser (:func:`orthogonality`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from peft import AdaLoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.adalora import AdaLoraLayer
from torch import Tensor, nn

from fedlora.aggregation.factors import LoraFactors

#: the settings a plan's ``adalora`` holds: the share of its rank AdaLoRA's budget keeps on average;
#: the shares of its steps before the budget falls and after it reaches the target; how many
#: steps between allocations; the EMA factors of the importance scores; the orthogonality weight
SETTINGS = ("budget", "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg_weight")


def target_rank(rank: int, budget: float) -> int:
    """AdaLoRA's target average rank for an adapter of ``rank``: ⌊budget·rank⌋, at least 1."""
    return max(1, int(budget * rank))


def adalora_config(rank: int, alpha: float, target_modules: Iterable[str], steps: int,
                   settings: Mapping[str, Any]) -> AdaLoraConfig:
    """PEFT's AdaLoraConfig for a client of ``rank`` that takes ``steps`` optimizer steps: no
    dropout or bias, its warm-up and final phases the shares ``tinit`` and ``tfinal`` of the steps
    (leaving at least one step of budgeting)."""
    tinit = int(settings["tinit"] * steps)
    tfinal = min(int(settings["tfinal"] * steps), max(0, steps - tinit - 1))
    return AdaLoraConfig(init_r=rank, target_r=target_rank(rank, settings["budget"]), lora_alpha=alpha,
                         target_modules=list(target_modules), lora_dropout=0.0, bias="none",
                         task_type=TaskType.CAUSAL_LM, total_step=steps, tinit=tinit, tfinal=tfinal,
                         deltaT=settings["delta_t"], beta1=settings["beta1"], beta2=settings["beta2"],
                         orth_reg_weight=settings["orth_reg_weight"])


def attach_adalora(model: nn.Module, rank: int, alpha: float, target_modules: Iterable[str], steps: int,
                   settings: Mapping[str, Any], *, seed: int = 0) -> PeftModel:
    """``model`` wrapped in a fresh AdaLoRA adapter (PEFT draws P and Q; the seed forks the RNG)."""
    config = adalora_config(rank, alpha, target_modules, steps, settings)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def prunes(peft_model: PeftModel) -> bool:
    """Whether the adapter's budget is below its initial rank (with none to cut, PEFT's allocator
    has no triplet to drop and is not run)."""
    config = peft_model.peft_config["default"]
    return config.target_r < config.init_r


def allocate(peft_model: PeftModel, step: int) -> None:
    """AdaLoRA's budget allocation after optimizer step ``step`` (1-based), before the gradients are zeroed."""
    if prunes(peft_model):
        peft_model.base_model.update_and_allocate(step)


def adalora_layers(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, AdaLoraLayer]:
    """Module name (the transformers model's) → its AdaLoRA layer."""
    return {name: module for name, module in peft_model.get_base_model().named_modules()
            if isinstance(module, AdaLoraLayer) and adapter_name in module.lora_A}


def pruned_factors(peft_model: PeftModel, scale: float, adapter_name: str = "default") -> dict[str, LoraFactors]:
    """Every module's kept triplets as float32 LoRA factors at ``scale``: B = P[:, kept],
    A = c·Λ[kept]·Q[kept] with c = (PEFT's α/(r + 1e-5)) / scale, so ``scale·B·A`` is PEFT's
    delta weight. A module whose every λ was zeroed sends one zero triplet (its delta is zero)."""
    factors = {}
    for name, layer in adalora_layers(peft_model, adapter_name).items():
        P, E, Q = (getattr(layer, f"lora_{part}")[adapter_name].detach().float() for part in "BEA")
        effective = float(layer.scaling[adapter_name]) / (float(layer.ranknum[adapter_name]) + 1e-5)
        kept = (E.view(-1) != 0).nonzero().view(-1)
        if kept.numel() == 0:
            kept = torch.zeros(1, dtype=torch.long)
        A = (E[kept] * Q[kept]) * (effective / scale)
        factors[name] = LoraFactors(A=A.contiguous(), B=P[:, kept].contiguous(), scale=scale)
    return factors


def singular_vectors(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, LoraFactors]:
    """The live (differentiable) P and Q of every module, as B and A (Λ apart): what
    :func:`orthogonality` penalises."""
    return {name: LoraFactors(A=layer.lora_A[adapter_name], B=layer.lora_B[adapter_name],
                              scale=float(layer.scaling[adapter_name]))
            for name, layer in adalora_layers(peft_model, adapter_name).items()}


def orthogonality(factors: dict[str, LoraFactors], *, weight: float) -> Tensor:
    """AdaLoRA's orthogonality penalty, as PEFT adds it in ``AdaLoraModel.forward``: ``weight`` times
    the mean over every P and Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F."""
    terms = []
    for f in factors.values():
        for gram in (f.A @ f.A.T, f.B.T @ f.B):
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                    device=gram.device)))
    return weight * torch.stack(terms).mean()
