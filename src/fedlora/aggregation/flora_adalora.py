"""FLoRA with AdaLoRA clients: each client prunes its rank per module as it trains; the server stacks what is left, exactly.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations" (NeurIPS 2024, arXiv 2409.05976), whose appendix runs FLoRA with AdaLoRA (Zhang et
al., ICLR 2023) as the clients' local fine-tuning. Each client trains PEFT's AdaLoRA from its
configured rank r_k (init_r): per adapted weight an SVD-form update
``ΔW_k = α/(r_k + 1e-5) · P_k · diag(Λ_k) · Q_k`` whose triplets are scored after every step and
cut, over all modules together, to a budget falling from r_k to ⌊budget·r_k⌋ per module on
average, so the triplets left differ per module and per client (fedlora/lora/adalora.py). The
client sends, per module m, its ρ_k,m ≤ r_k kept triplets as LoRA factors (B = P[:, kept],
A = c·Λ·Q[kept], at the run's scale s_k), and the server stacks them as FLoRA does:

    B = [p_1 s_1 B_1 | … | p_K s_K B_K],  A = [A_1; …; A_K]   ⇒   s·B·A = Σ_k p_k ΔW_k exactly,

of rank Σ_k ρ_k,m per module (against Σ_k r_k for FLoRA's LoRA clients): merged into the base
weights, after which every client trains a fresh AdaLoRA. ``info``: ``ranks_sent``, the ranks
the round's clients sent summed over clients and modules, and ``flora_ranks``, what the same
clients send with LoRA (r_k on every module): the stack's rank saving.

What was not read: the appendix itself (only the paper's main text and public code, which has
no AdaLoRA path), so its budget and schedule are unknown; here: ``budget`` 0.5 (ours), the
phases ``tinit`` 0.1 and ``tfinal`` 0.2 of a client's steps (ours, as shares, because a client's
steps per round are few), ``delta_t`` 1, β1 = β2 = 0.85 and the orthogonality weight 0.5
(PEFT's defaults), the penalty computed by the client as PEFT's ``AdaLoraModel.forward`` does.

Weighting: as FLoRA's public code, dataset sizes (``examples``, the default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import Tensor

from fedlora.aggregation.factors import ClientUpdate, GlobalUpdate
from fedlora.aggregation.flora import FLoRA, FLoRAOptions
from fedlora.aggregation.method import Accumulator, ClientPlan, Regularizer, Slot, option


@dataclass(frozen=True)
class FLoRAAdaLoRAOptions(FLoRAOptions):
    budget: float = option(0.5, "AdaLoRA's target rank as a share of each client's rank (⌊budget·r⌋, at least 1), "
                                "averaged over modules")
    tinit: float = option(0.1, "share of a client's steps before its budget starts to fall")
    tfinal: float = option(0.2, "share of a client's steps after its budget reached the target")
    delta_t: int = option(1, "steps between two budget allocations")
    beta1: float = option(0.85, "EMA factor of the triplets' sensitivity")
    beta2: float = option(0.85, "EMA factor of the sensitivity's uncertainty")
    orth_reg_weight: float = option(0.5, "weight of AdaLoRA's orthogonality penalty on P and Q")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be a share of the rank in (0, 1], got {self.budget!r}")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a share of the steps in [0, 1), got {value!r}")
        if self.tinit + self.tfinal >= 1:
            raise ValueError(f"tinit + tfinal must leave steps to prune in, got {self.tinit} + {self.tfinal}")
        if isinstance(self.delta_t, bool) or not isinstance(self.delta_t, int) or self.delta_t < 1:
            raise ValueError(f"delta_t must be a positive integer, got {self.delta_t!r}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)!r}")
        if not (math.isfinite(self.orth_reg_weight) and self.orth_reg_weight >= 0):
            raise ValueError(f"orth_reg_weight must be a finite non-negative number, got {self.orth_reg_weight!r}")


class FLoRAAdaLoRA(FLoRA):
    """FLoRA with AdaLoRA clients (FLoRA's appendix): each sends its pruned P·Λ·Q per module, stacked exactly.

    Ranks differ per module and per client; the stack is still exactly Σ p_k ΔW_k, merged, and
    every client trains a fresh AdaLoRA next round. See the module docstring.
    """

    name = "flora-adalora"
    paper = "Wang et al., NeurIPS 2024, arXiv 2409.05976 (appendix)"
    exact = True
    sends = "P·Λ·Q per module, pruned: rank ≤ its own, per module"
    receives = "the stack (rank Σ of the ranks sent), merged; then a fresh AdaLoRA"
    Options = FLoRAAdaLoRAOptions
    sample_dp = False  # AdaLoRA allocates its budget between optimizer steps, outside Opacus' DP-SGD

    def plan(self, client_id: str, server_round: int) -> ClientPlan:
        """A fresh AdaLoRA from the client's rank, with AdaLoRA's orthogonality penalty."""
        options = self.options
        settings = {name: getattr(options, name) for name in ("budget", "tinit", "tfinal", "delta_t", "beta1",
                                                                "beta2")}
        return ClientPlan(rank=self.client_rank(client_id, server_round),
                          adalora={**settings, "orth_reg_weight": options.orth_reg_weight},
                          regularizer=Regularizer("fedlora.lora.adalora:orthogonality",
                                                  {"weight": options.orth_reg_weight})
                          if options.orth_reg_weight else None)

    def accumulator(self, slots: Sequence[Slot]) -> Accumulator:
        """The updates kept as they come: their ranks are known once they arrive (FLoRA's stack
        is laid out from the assigned ranks)."""
        return Accumulator(self, slots)

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        update = super().combine(updates, weights, server_round=server_round)
        info = {**update.info, "ranks_sent": sum(factors.rank for u in updates for factors in u.factors.values())}
        if self.context is not None:  # the clients' configured ranks: what LoRA clients would send
            info["flora_ranks"] = sum(self.context.ranks[u.client_id] * len(u.factors) for u in updates)
        return replace(update, info=info)
