"""FedMomentum: the exact aggregate, its leading rank-r SVD part kept as the adapter, the residual merged.

Yan et al., "FedMomentum: Preserving LoRA Training Momentum in Federated Fine-Tuning" (arXiv
2603.08014, March 2026; ICLR 2026 submission). Read: the abstract (arxiv.org/abs/2603.08014
and its HTML v1) and two summaries of the paper (papers.lunadong.com/paper/9812,
tomesphere.com/paper/2603.08014); no public code was found and the method section was not
reachable. What they state: the server aggregates the clients' full updates B_k A_k "in a
mathematically correct manner", applies (randomized) SVD, reconstructs the LoRA modules at the
same rank from the dominant components ("major components … preserving momentum") and merges
the residual components into the backbone. Implemented as

    S = Σ_k p_k s_k B_k A_k = U Σ Vᵀ            (p_k example shares summing to 1; clients start
                                                 from the adapter, so S is the new adapter + residual)
    adapter:  B = U_r Σ_r, A = V_rᵀ              (r the clients' one rank; clients continue from it)
    merged:   W ← W + Σ_{i>r} σ_i u_i v_iᵀ       (the numerically nonzero rest)

so the base weights plus the adapter change by exactly Σ p_k (ΔW_k − ΔW_start).

Momentum: in what could be read, "training momentum" is not an optimiser term but the LoRA
state accumulating across rounds, lost when FLoRA re-initialises the LoRA or FFA-LoRA freezes
A; keeping the leading part as the adapter is how the paper preserves it. No server velocity
(β·v + Δ) is defined there, so none is added; if the paper's body defines one, it is missing.

Compared with ``flora-warm`` (flora_warm.py), which is the same construction: both form the
exact S from FLoRA's stack with normalised example weights, take one SVD of it, keep its
leading r triplets as the adapter every client continues from and merge the numerically nonzero
rest, so W_{t+1} + G_{t+1} = W_t + S. They differ in (1) ranks: FedMomentum is defined for one
rank r, the adapter's, and refuses mixed ranks; flora-warm keeps r_min, the smallest rank of a
mixed run (at one rank r_min = r and the updates are identical bit for bit, which the tests
check); (2) the SVD: the paper decomposes the dense d×n aggregate by randomized SVD (an
approximation); here, as in flora-warm, the exact SVD comes from the factors (thin QRs and a
core of at most Kr×Kr), never the dense matrix; (3) the split of U_rΣ_rV_rᵀ into B and A is not
stated in what was read: B = U_rΣ_r, A = V_rᵀ (flora-warm's ``row_norm`` 1, kept as an option).
"""

from __future__ import annotations

from fedlora.aggregation.factors import ClientUpdate
from fedlora.aggregation.fedit import require_homogeneous
from fedlora.aggregation.flora_warm import FLoRAWarm


class FedMomentum(FLoRAWarm):
    """FedMomentum (Yan et al., arXiv 2603.08014): exact aggregate, top-r SVD part the adapter, the rest merged.

    One rank r for every client: the exact Σ p_k s_k B_k A_k is split by one factored SVD into
    the rank-r adapter clients continue from and the residual merged into the base weights. At
    one rank, flora-warm's update (see the module docstring for how the two compare).

    Weighting: no public code; the run's ``weighting`` (default ``examples``).
    """

    name = "fedmomentum"
    paper = "arXiv 2603.08014"
    exact = True
    sends = "A_k, B_k"
    receives = "the leading rank-r adapter and the merged rest"
    heterogeneous_ranks = False

    def shared_rank(self, updates: list[ClientUpdate]) -> int:
        """r, every client's rank: the adapter keeps it."""
        for module in updates[0].factors:
            require_homogeneous(updates, module, self.name)
        return super().shared_rank(updates)
