"""raFLoRA: rank-partitioned aggregation, each partition averaged over the clients that hold it."""

from __future__ import annotations

from fedlora.aggregation.factors import ClientUpdate, LoraFactors
from fedlora.aggregation.factored import concat
from fedlora.aggregation.flexlora import FlexLoRA


def partition_blocks(blocks: list[LoraFactors], weights: list[float]) -> tuple[list[LoraFactors], list[float]]:
    """Split each client's factors at the round's distinct ranks and weight each piece within its partition.

    With distinct ranks b_1 < … < b_m, partition j holds rank components [b_{j-1}, b_j); the
    clients holding it are those with r_k ≥ b_j, and client k's piece gets p_k / Σ_{holders} p.
    ``concat`` of the result is Σ_j Σ_{k holds j} p_k / (Σ_{holders} p) · s_k B_k^{(j)} A_k^{(j)}.
    """
    bounds = sorted({block.rank for block in blocks})
    pieces, piece_weights = [], []
    for low, high in zip([0, *bounds], bounds):
        holders = [(block, weight) for block, weight in zip(blocks, weights) if block.rank >= high]
        total = sum(weight for _, weight in holders)
        if total == 0:  # explicit zero weights for every holder: the partition adds nothing
            continue
        for block, weight in holders:
            pieces.append(LoraFactors(A=block.A[low:high], B=block.B[:, low:high], scale=block.scale))
            piece_weights.append(weight / total)
    return pieces, piece_weights


class RaFLoRA(FlexLoRA):
    """raFLoRA (Wu et al., 2026, arXiv 2602.13486): each rank partition averaged over its holders, then an SVD.

    The paper's rank collapse: with SVD-based allocation (FlexLoRA) a rank component beyond
    the smallest client rank is updated only by the clients that hold it, yet averaged with
    every client's weight, so the energy above the minimum shared rank shrinks geometrically
    over rounds. raFLoRA cuts each client's update at the round's distinct ranks and averages
    each partition over its holders only (:func:`partition_blocks`, weights renormalised to
    their example shares); the sum, kept factored (rank Σ r_k), is decomposed and each client
    gets its best rank-r_k part, as in FlexLoRA. No public code was found; partitions at the
    participants' distinct ranks and holder-renormalised example shares are the simplest
    reading of the paper's abstract and method summary. With one rank (and weights summing to
    1, as example shares do) it equals FlexLoRA; with mixed ranks it is deliberately not Σ p_k ΔW_k.

    Weighting: no public code; each partition renormalises the run's weights over its holders.
    """

    name = "raflora"
    paper = "Wu et al., arXiv 2602.13486"
    exact = False
    sends = "A_k, B_k at its rank"
    receives = "the partition-weighted sum's SVD cut to its own rank"

    def global_sum(self, updates: list[ClientUpdate], weights: list[float]) -> dict[str, LoraFactors]:
        """The partition-weighted sum per module, factored."""
        return {module: concat(*partition_blocks([update.factors[module] for update in updates], weights))
                for module in updates[0].factors}
