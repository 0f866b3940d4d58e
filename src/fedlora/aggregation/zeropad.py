"""Zero-padding: average factors of different ranks by padding to the largest (HetLoRA without its norm weights)."""

from __future__ import annotations

from fedlora.aggregation.factors import ClientUpdate, GlobalUpdate, LoraFactors
from fedlora.aggregation.factored import average_factors, fit_ranks
from fedlora.aggregation.fedit import FedIT


class ZeroPad(FedIT):
    """FedIT for mixed ranks: pad every A_k (rows) and B_k (columns) with zeros to the largest rank.

    Each client's own scale is folded into its B before averaging (B_k ← s_k B_k) and the
    global scale is 1.0. Reference implementations average factors trained under different
    α/r and so mix scalings; folding keeps every client's contribution at the scale it was
    trained with. Like FedIT, the result carries cross-term error (it is not Σ p_k ΔW_k).
    A client of rank r starts from the first r components of the global adapter, extended by
    fresh components when the round's participants all had smaller ranks.

    Weighting: FLoRA's public code (its zero-padding path) weighs by dataset sizes: ``examples``.
    """

    name = "zeropad"
    paper = ""  # a baseline, not FedIT's
    exact = False
    sends = "A_k, B_k at its rank"
    receives = "Ā, B̄ zero-padded to the largest rank, cut to its own"
    heterogeneous_ranks = True

    def average_module(self, updates: list[ClientUpdate], weights: list[float], module: str) -> LoraFactors:
        folded = [LoraFactors(A=factors.A, B=factors.scale * factors.B, scale=1.0)
                  for factors in (update.factors[module] for update in updates)]
        return average_factors(folded, weights)

    def client_start(self, global_update: GlobalUpdate, client_id: str,
                     rank: int) -> dict[str, LoraFactors] | None:
        """The global factors fitted to the client's rank (scale stays the global 1.0)."""
        return fit_ranks(global_update.factors, rank, self.seed)
