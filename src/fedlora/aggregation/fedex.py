"""FedEx-LoRA: FedIT's averaged adapter plus an exact residual merged into the base weights."""

from __future__ import annotations

from torch import Tensor

from dataclasses import dataclass

from fedlora.aggregation.factored import concat, max_rank, normalized, refactor_all
from fedlora.aggregation.factors import ClientUpdate, GlobalUpdate, example_weights
from fedlora.aggregation.fedit import FedIT
from fedlora.aggregation.method import MethodOptions, option


@dataclass(frozen=True)
class FedExOptions(MethodOptions):
    compact_residual: bool = option(False, "re-factor the residual to its numerical rank, without loss")


class FedExLoRA(FedIT):
    """Average A and B like FedIT, and correct the cross-term error exactly (Singhal et al., 2024).

    residual = Σ p_k ΔW_k − s·B̄·Ā stays factored: B = [p_1 s_1 B_1 | … | −s B̄],
    A = [A_1; …; Ā], so ``delta`` (average + residual) is exactly Σ p_k ΔW_k with the weights
    normalised to sum 1. Clients continue from the average (merge=False); the engine merges
    the residual into the base weights. ``compact_residual`` re-factors the residual to its
    numerical rank without loss.

    Weighting: FedEx-LoRA's own code was not read; FedSVD's public code runs it (``_agg_fedex``)
    with the clients' train sizes: ``examples``, the default.
    """

    name = "fedex"
    paper = "Singhal et al., arXiv 2410.09432"
    exact = True
    sends = "A_k, B_k"
    receives = "Ā, B̄ and the exact residual, merged"
    Options = FedExOptions

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        average = super().combine(updates, weights, server_round=server_round)
        weights = normalized(example_weights(updates, weights))
        residual = {module: concat([*(update.factors[module] for update in updates), factors],
                                   [*weights, -1.0])
                    for module, factors in average.factors.items()}
        if self.options.compact_residual:
            residual, _ = refactor_all(residual)
        return GlobalUpdate(factors=average.factors, merge=False, residual=residual,
                            info={"residual_rank": max_rank(residual)})
