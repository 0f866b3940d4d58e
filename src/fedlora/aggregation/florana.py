"""FLoRA-NA: the rank-r pair (B̂, Â) closest to the exact sum Σ p_k s_k B_k A_k, which clients continue from.

Nguyen et al., "Communication-Efficient and Accurate Approach for Aggregation in Federated
Low-Rank Adaptation" (FLoRA-NA, arXiv 2509.26399; ICLR 2026 submission). Read: the abstract
(arxiv.org/abs/2509.26399 and its HTML v3) and summaries of it; no public code was found and
the method section was not reachable. The abstract states the objective: the server, from the
local LoRA matrices the clients send (A_u, B_u, as FedIT's clients do: no extra communication),
estimates surrogate aggregated matrices Â, B̂ that minimise the divergence between the ideal
update ∇W̄ = Σ_u B_u A_u and the practical one ∇Ŵ = B̂Â, and distributes them to the clients
for their next local updates. Implemented here with the Frobenius norm as the divergence:

    S = Σ_k p_k s_k B_k A_k                  (p_k the example shares, normalised to sum 1)
    (B̂, Â) = argmin_{rank r} ‖S − B̂Â‖_F      = (U_r Σ_r, V_rᵀ) of the thin SVD S = U Σ Vᵀ

(Eckart–Young), from FLoRA's stack of the factors (two thin QRs and an SVD of the Kr×Kr core;
the d×n S is never formed), r the clients' rank. If the paper fits (B̂, Â) by another closed
form or an iteration, that is not what is here: for this objective the truncated SVD is the
global minimiser any such procedure can reach. The split of UΣVᵀ into B̂ and Â is not stated
in the abstract; B̂ = U_rΣ_r, Â = V_rᵀ (scale 1; each client rescales B̂ to its s).
"""

from __future__ import annotations

from torch import Tensor

from fedlora.aggregation.factored import normalized, refactor, stack
from fedlora.aggregation.factors import ClientUpdate, GlobalUpdate, example_weights
from fedlora.aggregation.fedit import require_homogeneous
from fedlora.aggregation.method import Aggregator


class FLoRANA(Aggregator):
    """FLoRA-NA (Nguyen et al., arXiv 2509.26399): the rank-r pair closest to Σ p_k ΔW_k, by a factored SVD.

    Clients send A_k and B_k and continue from the surrogate pair (B̂, Â) = the best rank-r
    approximation of the exact sum (merge=False, nothing merged into the base). Exact when that
    sum has rank ≤ r (one client); otherwise the truncation is the aggregation error, reported
    as ``info["truncation_error"]`` (the largest relative Frobenius error over modules).

    Weighting: no public code; the run's ``weighting`` (default ``examples``).
    """

    name = "florana"
    paper = "arXiv 2509.26399"
    exact = False
    sends = "A_k, B_k"
    receives = "the best rank-r pair of the exact update"
    heterogeneous_ranks = False

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        weights = normalized(example_weights(updates, weights))
        factors, worst = {}, 0.0
        for module, stacked in stack(updates, weights).items():
            require_homogeneous(updates, module, self.name)
            factors[module], error = refactor(stacked, updates[0].factors[module].rank)
            worst = max(worst, error)
        return GlobalUpdate(factors=factors, merge=False, info={"truncation_error": worst})
