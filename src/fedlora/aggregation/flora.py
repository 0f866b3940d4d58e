"""FLoRA: stack the clients' factors so the global update is exactly Σ p_k ΔW_k, for any ranks."""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.aggregation.base import Aggregator, ClientUpdate, GlobalUpdate, check_updates, example_weights
from fedlora.aggregation.factored import max_rank, refactor_all, stack

COMPRESS_MODES = ("none", "exact")


class FLoRA(Aggregator):
    """Stacking aggregation (Wang et al., 2024): B = [p_1 s_1 B_1 | … | p_K s_K B_K], A = [A_1; …; A_K].

    The global update is merged into the base weights and every client starts a fresh LoRA.
    Weights are used as given (not normalised), so ``B @ A == Σ p_k ΔW_k``.

    ``compress``: ``"none"`` broadcasts the stack (rank ΣR); ``"exact"`` re-factors it to its
    numerical rank (≤ min(d, n, ΣR)) at no loss; an int truncates to that rank via a factored
    SVD and reports the relative Frobenius error in ``info["truncation_error"]``.
    ``shuffle``: a seed that permutes the order of the stacked client blocks (so the position
    of a block does not reveal its client); the product is unchanged.
    """

    name = "flora"

    def __init__(self, compress: str | int = "none", shuffle: int | None = None):
        valid_rank = isinstance(compress, int) and not isinstance(compress, bool) and compress >= 1
        if compress not in COMPRESS_MODES and not valid_rank:
            raise ValueError(f"compress must be 'none', 'exact' or a positive rank, got {compress!r}")
        self.compress = compress
        self.shuffle = shuffle

    def aggregate(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                  server_round: int | None = None) -> GlobalUpdate:
        check_updates(updates)
        weights = example_weights(updates, weights)
        order = self._block_order(len(updates))
        factors = stack([updates[i] for i in order], [weights[i] for i in order])
        error = 0.0
        if self.compress != "none":
            factors, error = refactor_all(factors, None if self.compress == "exact" else self.compress)
        return GlobalUpdate(factors=factors, merge=True,
                            info={"broadcast_rank": max_rank(factors), "truncation_error": error})

    def _block_order(self, count: int) -> list[int]:
        if self.shuffle is None:
            return list(range(count))
        generator = torch.Generator().manual_seed(self.shuffle)
        return torch.randperm(count, generator=generator).tolist()
