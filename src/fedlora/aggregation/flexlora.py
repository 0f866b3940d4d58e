"""FlexLoRA: exact global update, sent back to each client truncated to its own rank by SVD."""

from __future__ import annotations

from torch import Tensor

from fedlora.aggregation.factored import factored_svd, fit_ranks, max_rank, stack, truncate
from fedlora.aggregation.factors import AggregationError, ClientUpdate, GlobalUpdate, LoraFactors, example_weights
from fedlora.aggregation.method import Aggregator


class FlexLoRA(Aggregator):
    """Σ p_k ΔW_k via stacking, then an SVD per module (Bai et al., 2024).

    The reference implementation forms each dense d×n update and runs a full SVD; here the SVD
    comes from the stacked factors (two thin QRs and an R×R core), with the same result.
    ``factors`` is the exact global in SVD order (rank ≤ ΣR); ``client_factors[c]`` is its
    best approximation at client c's rank. ``info["truncation_error"]`` is the largest
    relative Frobenius error over clients and modules.

    Weighting: the public code runs on FederatedScope, whose FedAvg weighs each client by the
    examples it processed that round (``ctx.num_samples``): ``weighting = "processed"`` follows
    it; fedlora's default, ``examples``, weighs by dataset sizes.
    """

    name = "flexlora"
    paper = "Bai et al., NeurIPS 2024, arXiv 2402.11505"
    exact = False
    sends = "A_k, B_k at its rank"
    receives = "the exact update's SVD cut to its own rank"

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        require_unique_clients(updates)
        weights = example_weights(updates, weights)
        global_factors: dict[str, LoraFactors] = {}
        client_factors: dict[str, dict[str, LoraFactors]] = {update.client_id: {} for update in updates}
        worst = 0.0
        for module, stacked in self.global_sum(updates, weights).items():
            svd = factored_svd(stacked.B, stacked.A)
            global_factors[module], _ = truncate(svd)
            for update in updates:
                client_factors[update.client_id][module], error = truncate(svd, update.factors[module].rank)
                worst = max(worst, error)
        return GlobalUpdate(factors=global_factors, merge=False, client_factors=client_factors,
                            info={"broadcast_rank": max_rank(global_factors), "truncation_error": worst})

    def global_sum(self, updates: list[ClientUpdate], weights: list[float]) -> dict[str, LoraFactors]:
        """The global update before its SVD, per module: FlexLoRA's is the exact Σ p_k ΔW_k."""
        return stack(updates, weights)

    def client_start(self, global_update: GlobalUpdate, client_id: str,
                     rank: int) -> dict[str, LoraFactors] | None:
        """The client's own truncation, or for a client that did not report, the global's leading
        ``rank`` components (the global is in SVD order, so this is its best rank-r part),
        extended by fresh components where the client's rank exceeds the global's."""
        if client_id in global_update.client_factors:
            return global_update.client_factors[client_id]
        return fit_ranks(global_update.factors, rank, self.seed)


def require_unique_clients(updates: list[ClientUpdate]) -> None:
    """Per-client results are keyed by client id, so two updates may not share one."""
    seen: set[str] = set()
    for update in updates:
        if update.client_id in seen:
            raise AggregationError("sent more than one update this round", client_id=update.client_id,
                                   rule="client_id")
        seen.add(update.client_id)
