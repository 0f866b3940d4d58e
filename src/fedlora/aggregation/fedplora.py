"""Fed-PLoRA: R parallel rank-one modules; each client trains r_k of them, the others folded into its weights.

Zhang, Hu, Xu, "Heterogeneous Federated Fine-Tuning with Parallel One-Rank Adaptation"
(Fed-PLoRA, ICLR 2026, arXiv 2602.16936). Read: the abstract (arxiv.org/abs/2602.16936 and the
start of its HTML v1), a detailed summary of its method section with its equations (papernotes,
ICLR 2026) and the OpenReview reviews; the code (github.com/TNI-playground/Fed-PLoRA) was not
reachable. What they state, with R the global rank (here the largest client rank) and r_k ≤ R
client k's:

    PLoRA        ΔW = Σ_{j=1..R} B_(j) A_(j) = B A          (B_(j) = B[:, j], A_(j) = A[j, :]: R
                                                          parallel one-rank modules, LoRA's product)
    Select-N-Fold  client k draws K_k ⊂ {1..R}, |K_k| = r_k, at random each round, and trains
                 on W_k = W⁰ + Σ_{j∉K_k} B_(j) A_(j)        (the untrained modules folded into its
                                                          frozen weights) the modules j ∈ K_k, from
                                                          the global B_(j), A_(j)
    aggregation  per module j, over Q_j = {k : j ∈ K_k}:  B_(j) ← Σ_{k∈Q_j} p_k B_k,(j) / Σ_{k∈Q_j} p_k,
                 A_(j) likewise; a module no client trained keeps its value

so a client starts from exactly the global model (zero "initialisation noise", the paper's
point) and the aggregate is FedIT's average per module (its cross terms are the paper's
"aggregation noise": not exact). With every r_k = R it is FedIT. Clients download every module
(their r_k to train and the R − r_k they fold: the downlink the reviews note) and upload r_k.

Choices where what was read is silent: one K_k per client and round for every adapted layer,
drawn from the run's seed (so the server knows it without a message); p_k the run's weights
renormalised over Q_j (holder-weighted, as raFLoRA); the global modules at scale 1 with each
client's scale folded into its B (as ``zeropad``); round 1 starts from a rank-R LoRA drawn from
the seed (A Kaiming-uniform as PEFT's, B zero), the same for every client.

Weighting: the code was not read; the run's ``weighting`` (default ``examples``).
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from fedlora.aggregation.factored import fit_ranks
from fedlora.aggregation.factors import AggregationError, ClientUpdate, GlobalUpdate, LoraFactors, example_weights
from fedlora.aggregation.method import Aggregator, ClientPlan


class FedPLoRA(Aggregator):
    """Fed-PLoRA (Zhang et al., ICLR 2026, arXiv 2602.16936): parallel rank-one modules, Select-N-Fold, per-module averages.

    The global adapter has R rank-one modules (R the largest client rank). Each round a client of
    rank r_k trains r_k of them drawn at random, from their global values, with the other R − r_k
    folded into its frozen weights for the round; the server averages each module over the
    clients that trained it. See the module docstring for the equations.
    """

    name = "fedplora"
    paper = "Zhang et al., ICLR 2026, arXiv 2602.16936"
    exact = False
    sends = "its r_k rank-one modules (A_k, B_k at its rank)"
    receives = "all R modules: r_k to train, the rest folded into its weights"
    heterogeneous_ranks = True

    @property
    def global_rank(self) -> int:
        """R: the largest client rank."""
        return max(self.context.ranks.values())

    def selection(self, client_id: str, server_round: int) -> list[int]:
        """K_k: the modules ``client_id`` trains in ``server_round`` (ascending), drawn from the run's seed."""
        rank, total = self.context.ranks[client_id], self.global_rank
        if rank >= total:
            return list(range(total))
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/fedplora/{server_round}/{client_id}".encode()))
        return sorted(torch.randperm(total, generator=generator)[:rank].tolist())

    def modules(self) -> dict[str, LoraFactors]:
        """The R global modules: the last update's, or, before any, a rank-R LoRA drawn from the seed."""
        if self.global_update is not None:
            return self.global_update.factors
        empty = {module: LoraFactors(torch.zeros(0, n), torch.zeros(d, 0), 1.0)
                 for module, (d, n) in self.context.shapes.items()}
        return fit_ranks(empty, self.global_rank, self.seed)

    def plan(self, client_id: str, server_round: int) -> ClientPlan:
        """Train the selected modules from their global values; fold the others."""
        chosen = self.selection(client_id, server_round)
        others = [j for j in range(self.global_rank) if j not in chosen]
        start, folded = {}, {}
        for module, factors in self.modules().items():
            start[module] = LoraFactors(factors.A[chosen], factors.B[:, chosen], factors.scale)
            if others:
                folded[module] = LoraFactors(factors.A[others], factors.B[:, others], factors.scale)
        return ClientPlan(rank=len(chosen), start=start, folded=folded or None)

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        if server_round is None:
            raise AggregationError("fedplora needs the server_round (1-based) to know which modules each client "
                                   "trained", rule="phase")
        weights = example_weights(updates, weights)
        chosen = {update.client_id: self.selection(update.client_id, server_round) for update in updates}
        for update in updates:
            for module, factors in update.factors.items():
                if factors.rank != len(chosen[update.client_id]):
                    raise AggregationError(f"rank {factors.rank} differs from the {len(chosen[update.client_id])} "
                                           "modules it was given", client_id=update.client_id, module=module,
                                           rule="shape")
        factors = {}
        for module, previous in self.modules().items():
            like = updates[0].factors[module].A  # the result in the updates' device and dtype
            A = previous.A.to(like.device, like.dtype).clone()
            B = (previous.B.to(like.device, like.dtype) * previous.scale).clone()
            for j in range(self.global_rank):
                holders = [(weight, update, chosen[update.client_id].index(j))
                           for weight, update in zip(weights, updates) if j in chosen[update.client_id]]
                total = sum(weight for weight, _, _ in holders)
                if not holders or total == 0:
                    continue  # no client trained module j: it keeps its value
                A[j] = sum(weight / total * update.factors[module].A[i].to(A.dtype) for weight, update, i in holders)
                B[:, j] = sum(weight / total * update.factors[module].scale * update.factors[module].B[:, i].to(B.dtype)
                              for weight, update, i in holders)
            factors[module] = LoraFactors(A, B, 1.0)
        return GlobalUpdate(factors=factors, merge=False, info={"global_rank": self.global_rank})
