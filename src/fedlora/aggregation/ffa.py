"""FFA-LoRA: A is shared and frozen, only B is trained and averaged — exact for a common A."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from fedlora.aggregation.factored import normalized, padded_sum
from fedlora.aggregation.factors import AggregationError, ClientUpdate, GlobalUpdate, LoraFactors, example_weights
from fedlora.aggregation.fedit import require_homogeneous
from fedlora.aggregation.method import Aggregator

RANK_DIM = {"A": 0, "B": 1}


def average_trained(updates: list[ClientUpdate], weights: list[float], module: str, trained: str,
                    method: str) -> LoraFactors:
    """Average the ``trained`` factor; the other one must be bit-identical across clients.

    With a common frozen factor F (and a common scale s) the average is exact:
    s·(Σ p_k B_k)·A = Σ p_k s·B_k·A, and likewise for a frozen B.
    """
    require_homogeneous(updates, module, method)
    frozen = "A" if trained == "B" else "B"
    reference = updates[0]
    expected = getattr(reference.factors[module], frozen)
    for update in updates[1:]:
        if not torch.equal(getattr(update.factors[module], frozen), expected):
            raise AggregationError(
                f"frozen factor {frozen} differs from client {reference.client_id!r}'s; {method} "
                f"needs every client to start from the same {frozen} and leave it untouched",
                client_id=update.client_id, module=module, rule="frozen")
    average = padded_sum([getattr(update.factors[module], trained) for update in updates], weights,
                         rank_dim=RANK_DIM[trained])
    return replace(reference.factors[module], **{trained: average})


class FFALoRA(Aggregator):
    """Clients train only B on a shared, frozen A (Sun et al., 2024); the B average is exact.

    Weighting: FFA-LoRA's own code was not read; FedSVD's public code runs it (its ``ffa`` path)
    with the clients' train sizes (``examples``), or uniformly with ``--balanced`` (``uniform``).
    """

    name = "ffa"
    paper = "Sun et al., ICLR 2024, arXiv 2403.12313"
    exact = True
    sends = "B_k"
    receives = "B̄ (A fixed from round 1)"
    heterogeneous_ranks = False
    client_dp = True

    def trainable(self, server_round: int) -> frozenset[str]:
        return frozenset({"B"})

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        weights = normalized(example_weights(updates, weights))
        factors = {module: average_trained(updates, weights, module, "B", self.name)
                   for module in updates[0].factors}
        return GlobalUpdate(factors=factors, merge=False)
