"""FLoRA-warm: FLoRA's exact update for any mix of ranks, with a global adapter kept across rounds."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.aggregation.factored import Svd, concat, factored_svd, normalized, numerical_rank, stack
from fedlora.aggregation.factors import ClientUpdate, GlobalUpdate, LoraFactors, example_weights
from fedlora.aggregation.method import Aggregator, MethodOptions, option


def components(svd: Svd, start: int, stop: int, row_norm: float = 1.0) -> LoraFactors:
    """Singular triplets ``start:stop`` as factors: A = row_norm·Vh (rows of that norm),
    B = U·S / row_norm (scale 1)."""
    U, S, Vh = svd
    return LoraFactors(A=Vh[start:stop] * row_norm, B=U[:, start:stop] * (S[start:stop] / row_norm), scale=1.0)


def energy_beyond(S: Tensor, rank: int) -> float:
    """The share of ``Σ σ²`` outside the leading ``rank`` singular values (0 for a zero matrix)."""
    energy = S.to(torch.float64).square()
    total = energy.sum().item()
    return energy[rank:].sum().item() / total if total > 0 else 0.0


@dataclass(frozen=True)
class FLoRAWarmOptions(MethodOptions):
    row_norm: float = option(1.0, "the norm of each row of the kept adapter's A (B absorbs the rest)")

    def __post_init__(self) -> None:
        if isinstance(self.row_norm, bool) or not isinstance(self.row_norm, (int, float)) \
                or not 0 < self.row_norm < float("inf"):
            raise ValueError(f"row_norm must be a positive number, got {self.row_norm!r}")


class FLoRAWarm(Aggregator):
    """Exact for any ranks and warm: a global adapter of the smallest rank carries over, the rest is merged.

    The global model is the base weights W_t plus a global adapter G_t of rank r_min, the
    smallest client rank of the run, so every client can hold it. A client starts its LoRA from
    G_t (components beyond r_min fresh, B zero), i.e. from exactly the global model, and trains
    s_k B_k A_k. The exact new model is W_t + S with S = Σ p_k s_k B_k A_k (FLoRA's stack; the
    weights are normalised to sum 1 because G_t is part of every client's model). One factored
    SVD of the stack (thin QRs of its factors, an SVD of the small core) splits S: its leading
    r_min singular triplets are G_{t+1}, kept as the adapter clients continue from; the others
    (the residual S − G_{t+1}, numerically nonzero triplets only) are merged into the base
    weights, so W_{t+1} + G_{t+1} = W_t + S. Both together have the stack's numerical rank
    (≤ ΣR): a client downloads no more than FLoRA's stack.

    ``row_norm``: the norm of each row of the adapter's A (1: orthonormal rows; 1/√3 is the
    mean row norm of a fresh LoRA's A under PEFT's Kaiming-uniform init), B absorbing the
    rest: the product is the same, the clients' optimizer sees other step sizes.

    ``info``: ``shared_rank`` (r_min), ``broadcast_rank`` and ``residual_rank`` (largest over
    modules), ``energy_outside_shared_rank`` (mean over modules) and its ``_max``: raFLoRA's
    rank-collapse diagnostic, the share of the round's global update Σ p_k (M_k − W) lying
    outside its leading r_min directions; ``merged_share``: the mean share of S's energy
    merged into the base rather than kept in the adapter.

    Weighting: fedlora's own method: the run's ``weighting`` (default ``examples``).
    """

    name = "flora-warm"
    exact = True
    sends = "A_k, B_k at its rank"
    receives = "an adapter of rank r_min and the merged rest (≤ FLoRA's stack)"
    Options = FLoRAWarmOptions

    def shared_rank(self, updates: list[ClientUpdate]) -> int:
        """r_min: the smallest rank of the run (of these updates, without a run context)."""
        if self.context is not None:
            return min(self.context.ranks.values())
        return min(factors.rank for update in updates for factors in update.factors.values())

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        weights = normalized(example_weights(updates, weights))
        rank = self.shared_rank(updates)
        previous = self.global_update.factors if self.global_update is not None else {}
        adapter, residual, outside, merged = {}, {}, [], []
        for module, stacked in stack(updates, weights).items():
            U, S, Vh = svd = factored_svd(stacked.B, stacked.A)
            nonzero = numerical_rank(S, max(U.shape[0], Vh.shape[1]))
            kept = max(1, min(rank, nonzero))
            adapter[module] = components(svd, 0, kept, float(self.options.row_norm))
            if nonzero > kept:
                residual[module] = components(svd, kept, nonzero)
            merged.append(energy_beyond(S, kept))
            change = S  # the round's update Σ p_k (M_k − W) = S − G_t; G_t is zero before any round
            if module in previous:
                difference = concat([stacked, previous[module]], [1.0, -1.0])
                change = factored_svd(difference.B, difference.A)[1]
            outside.append(energy_beyond(change, rank))
        return GlobalUpdate(factors=adapter, merge=False, residual=residual, info={
            "shared_rank": rank,
            "broadcast_rank": max(adapter[m].rank + (residual[m].rank if m in residual else 0) for m in adapter),
            "residual_rank": max((f.rank for f in residual.values()), default=0),
            "energy_outside_shared_rank": sum(outside) / len(outside),
            "energy_outside_shared_rank_max": max(outside),
            "merged_share": sum(merged) / len(merged)})
