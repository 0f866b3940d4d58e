"""FedSVD: clients train B on a shared frozen A; the server re-factors B̄·A by SVD into a new orthonormal A.

Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA"
(NeurIPS 2025, arXiv 2505.12805). Read: the abstract (arxiv.org/abs/2505.12805 and its HTML
v2) and the authors' code (github.com/seanie12/fed-svd: ``fedmm/fedavg/server.py``, the
``ffa`` aggregation; ``misc/utils.py:reinit_lora``; ``parser.py``; ``scripts/run_*.sh``). The
body of the paper was not reachable; what is implemented is the abstract's rule as that code
performs it:

    clients:  train only B_k, starting from (A_t, B_t); A_t frozen, the same for every client
    server:   B̄ = Σ_k p_k B_k                       (p_k the example shares, normalised to sum 1)
              U Σ Vᵀ = SVD(B̄ · A_t)                  (``prod = lora_B @ lora_A``; thin SVD)
              A_{t+1} = V_rᵀ,  B_{t+1} = U_r Σ_r     (``lora_A = Uhr``, ``lora_B = Vr @ diag(Sr)``)

with r the LoRA rank. The scale s = α/r is not part of the SVD: as in ``reinit_lora``, which
decomposes ``lora_B @ lora_A`` and leaves PEFT's scaling alone, the product decomposed is
B̄·A_t and the new pair keeps the clients' scale s, so s·B_{t+1}·A_{t+1} = s·B̄·A_t exactly (the
product has rank ≤ r, so nothing is cut). A client's LoRA then starts at exactly the global
adapter. A_1 is FFA-LoRA's: drawn from the run's seed (Kaiming-uniform, B zero,
:meth:`Aggregator.drawn_start`), as PEFT's default init on the authors' server. The code re-runs
the SVD every ``recalculate_svd_period`` rounds (1 in every script): ``period`` here; in the
rounds between, the update is FFA-LoRA's average on the unchanged A.

Where r exceeds min(d, n) the SVD has only min(d, n) components; A's further rows are drawn
fresh (B's columns zero), so the clients' rank and the product are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor

from fedlora.aggregation.factored import fit_ranks, refactor
from fedlora.aggregation.factors import AggregationError, ClientUpdate, GlobalUpdate, LoraFactors
from fedlora.aggregation.ffa import FFALoRA
from fedlora.aggregation.method import MethodOptions, option


@dataclass(frozen=True)
class FedSVDOptions(MethodOptions):
    period: int = option(1, "re-factor B̄·A by SVD every this many rounds (the authors' recalculate_svd_period); "
                            "between, FFA-LoRA's average on the unchanged A")

    def __post_init__(self) -> None:
        if isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 1:
            raise ValueError(f"period must be a positive integer, got {self.period!r}")


def reparameterised(mean: LoraFactors) -> LoraFactors:
    """(U_r Σ_r, V_rᵀ) of B̄·A (s left out, as the authors' code does) at the same scale s and rank r."""
    unscaled, _ = refactor(replace(mean, scale=1.0), mean.rank)
    return replace(unscaled, scale=mean.scale)


class FedSVD(FFALoRA):
    """FedSVD (Lee et al., NeurIPS 2025, arXiv 2505.12805): B averaged on a frozen A, then B̄·A re-factored by SVD.

    Clients train and send only B (A is the server's, the same for all); the server averages B
    and re-factors B̄·A into A = V_rᵀ (orthonormal rows) and B = U_r Σ_r, which every client
    starts its next round from: exact, as FFA-LoRA, with an A that follows the update's leading
    directions. Not ``client_dp``: the DP-FedAvg mixin noises the averaged B it broadcasts,
    while FedSVD broadcasts the re-factored pair, not that average.

    Weighting: the authors' code weighs by the clients' train sizes (``train_size / Σ``):
    ``examples``, the default; with its ``--balanced`` flag uniformly: ``uniform``.
    """

    name = "fedsvd"
    paper = "arXiv 2505.12805"
    exact = True
    sends = "B_k"
    receives = "the re-factored pair (A orthonormal)"
    client_dp = False
    Options = FedSVDOptions

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        average = super().combine(updates, weights, server_round=server_round)
        if not self.refactors(server_round):
            return average
        # fit_ranks gives back rank r where r > min(d, n) left the SVD fewer components
        factors = {module: fit_ranks({module: reparameterised(mean)}, mean.rank, self.seed)[module]
                   for module, mean in average.factors.items()}
        return replace(average, factors=factors)

    def refactors(self, server_round: int | None) -> bool:
        """Whether ``server_round`` (1-based) ends with the SVD: every ``period``-th round."""
        if self.options.period == 1:
            return True
        if server_round is None:
            raise AggregationError(f"fedsvd with period {self.options.period} needs the server_round (1-based) "
                                   "to know whether to re-factor", rule="phase")
        return server_round % self.options.period == 0
