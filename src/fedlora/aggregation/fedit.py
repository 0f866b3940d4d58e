"""FedIT: average A and B separately (Zhang et al., 2024) — the common, inexact baseline."""

from __future__ import annotations

from torch import Tensor

from fedlora.aggregation.factored import average_factors, normalized
from fedlora.aggregation.factors import AggregationError, ClientUpdate, GlobalUpdate, LoraFactors, example_weights
from fedlora.aggregation.method import Aggregator


def require_homogeneous(updates: list[ClientUpdate], module: str, method: str) -> None:
    """Methods that average factors, or keep one adapter of the clients' rank, need one rank and
    one scale across clients."""
    reference = updates[0]
    expected = reference.factors[module]
    for update in updates[1:]:
        factors = update.factors[module]
        if factors.rank != expected.rank or factors.scale != expected.scale:
            raise AggregationError(
                f"{method} needs one rank and scale across clients, got rank "
                f"{factors.rank} scale {factors.scale:g} vs rank {expected.rank} scale {expected.scale:g} "
                f"of client {reference.client_id!r}; use 'flora' (exact for any ranks) or 'zeropad'",
                client_id=update.client_id, module=module, rule="heterogeneous")


class FedIT(Aggregator):
    """B̄ = Σ p_k B_k and Ā = Σ p_k A_k (weights normalised to sum 1), at the clients' common scale.

    Clients continue from the averaged adapter (merge=False). Its product differs from
    Σ p_k ΔW_k by the cross terms p_j p_k B_j A_k, which FLoRA removes.

    Weighting: FLoRA's public code runs FedIT (its averaging path) with dataset-size weights:
    ``examples``, the default.
    """

    name = "fedit"
    paper = "Zhang et al., ICASSP 2024, arXiv 2305.05644"
    exact = False
    sends = "A_k, B_k"
    receives = "Ā, B̄"
    heterogeneous_ranks = False

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        weights = normalized(example_weights(updates, weights))
        factors = {module: self.average_module(updates, weights, module) for module in updates[0].factors}
        return GlobalUpdate(factors=factors, merge=False)

    def average_module(self, updates: list[ClientUpdate], weights: list[float], module: str) -> LoraFactors:
        """The averaged factors of one module (weights already normalised)."""
        require_homogeneous(updates, module, self.name)
        return average_factors([update.factors[module] for update in updates], weights)
