"""FLoRIST: FLoRA's exact stack, cut by a singular-value energy threshold to one global pair."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.aggregation.factored import factored_svd, max_rank, numerical_rank, truncate
from fedlora.aggregation.factors import GlobalUpdate, LoraFactors
from fedlora.aggregation.flora import FLoRA
from fedlora.aggregation.method import MethodOptions, option


@dataclass(frozen=True)
class FLoRISTOptions(MethodOptions):
    threshold: float = option(0.9, "the share of the stack's energy Σσ² the kept singular values hold, in (0, 1]")
    shuffle: int | None = option(None, "a seed permuting the clients' blocks in the stack (the product is unchanged)")

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be a share of the energy in (0, 1], got {self.threshold!r}")


def energy_rank(S: Tensor, threshold: float, size: int) -> int:
    """The fewest leading singular values holding ``threshold`` of the energy Σ S², at least 1 and
    at most the numerical rank (``size``: the matrix's larger side, for the round-off tolerance)."""
    energy = S.to(torch.float64).square()
    reached = int((energy.cumsum(0) < threshold * energy.sum()).sum()) + 1
    return max(1, min(reached, numerical_rank(S, size)))


class FLoRIST(FLoRA):
    """FLoRIST (Ramesh & Dass, MLSys 2026, arXiv 2506.09199): SVD of the stack, cut at a share of its energy.

    The weighted stack B = [p_1 s_1 B_1 | …], A = [A_1; …] (exactly Σ p_k ΔW_k, any ranks) is
    decomposed in its small intermediate space (two thin QRs and an SVD of the R×R core, where
    the paper takes SVDs of the stacked B and A: the same singular values) and truncated, per
    module as in the public code, to the fewest singular values whose energy Σ σ² reaches
    ``threshold`` of the total (0.9 is the code's default). The one global pair (B = U·Σ, A =
    Vᵀ) is merged into the base weights and every client trains a fresh LoRA of its own
    configured rank next round, as the public code does (merge_and_unload, then a new adapter
    at the client's rank); clients download only that pair. ``info``: ``broadcast_rank`` (the
    largest over modules) and ``truncation_error`` (the largest relative Frobenius error,
    ≤ sqrt(1 − threshold)).

    Weighting: not checked against the public code; the run's ``weighting`` (default ``examples``).
    """

    name = "florist"
    paper = "Ramesh & Dass, MLSys 2026, arXiv 2506.09199"
    exact = False
    sends = "A_k, B_k at its rank"
    receives = "one pair holding `threshold` of the stack's energy, merged"
    Options = FLoRISTOptions

    def broadcast(self, stacked: dict[str, LoraFactors]) -> GlobalUpdate:
        """Each module's stack truncated to its energy rank."""
        kept, worst = {}, 0.0
        for module, factors in stacked.items():
            U, S, Vh = svd = factored_svd(factors.scale * factors.B, factors.A)
            kept[module], error = truncate(svd, energy_rank(S, float(self.options.threshold), max(U.shape[0], Vh.shape[1])))
            worst = max(worst, error)
        return GlobalUpdate(factors=kept, merge=True,
                            info={"broadcast_rank": max_rank(kept), "truncation_error": worst})
