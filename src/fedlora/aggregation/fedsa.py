"""FedSA-LoRA: clients train A and B, share only A; each client keeps its own B across rounds."""

from __future__ import annotations

from torch import Tensor

from fedlora.aggregation.factored import average_factors, normalized
from fedlora.aggregation.factors import ClientUpdate, GlobalUpdate, LoraFactors, example_weights
from fedlora.aggregation.method import Aggregator
from fedlora.aggregation.fedit import require_homogeneous
from fedlora.aggregation.flexlora import require_unique_clients


class FedSALoRA(Aggregator):
    """FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463): only A is sent and averaged; each client keeps its B.

    The paper finds A learns what clients share and B what is client-specific, so both are
    trained, only A is sent and averaged (weights normalised to sum 1), and client k starts each
    round from (Ā, B_k): the global A and its own B from its last round, which it keeps in its
    own store and never sends (:attr:`kept_on_client`; zeros, as a fresh LoRA's B, before it has trained). Round 1
    starts every client from one A drawn from the run's seed, as the code's one global
    initialisation. One rank and one scale across clients: the paper and its code average A at
    a single rank.

    The server never sees a B: the global factors are Ā with a zero B, and the clients' models
    it evaluates, (Ā, B_k) for every client with their mean, as for ``local``, are completed
    with each B_k by the runtime that holds the clients (see README, "Methods").

    Weighting: the public code runs on FederatedScope, whose FedAvg weighs each client by the
    examples it processed that round (``ctx.num_samples``, its batches' sizes summed), not by its
    dataset size: ``weighting = "processed"`` follows it (uniform when every client runs the same
    full batches); fedlora's default, ``examples``, weighs by dataset sizes, which on clients of
    different sizes gives a different average.
    """

    name = "fedsa"
    paper = "Guo et al., ICLR 2025, arXiv 2410.01463"
    exact = None
    sends = "A_k (B_k stays on the client)"
    receives = "Ā"
    heterogeneous_ranks = False
    kept_on_client = frozenset({"B"})  # so only A is uploaded
    client_dp = True
    personalised = True

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        """Ā = Σ p_k A_k, with a zero B: the B's the server holds are placeholders, not the clients'."""
        require_unique_clients(updates)
        weights = normalized(example_weights(updates, weights))
        shared: dict[str, LoraFactors] = {}
        for module in updates[0].factors:
            require_homogeneous(updates, module, self.name)
            mean = average_factors([update.factors[module] for update in updates], weights)
            shared[module] = LoraFactors(A=mean.A, B=mean.B.new_zeros(mean.B.shape), scale=mean.scale)
        return GlobalUpdate(factors=shared, merge=False)

    def evaluation_adapters(self) -> dict[str | None, dict[str, LoraFactors] | None]:
        """Every client's model: Ā here, its own B completed by the runtime (None before round 1:
        every client's model is the base)."""
        factors = self.global_update.factors if self.global_update is not None else None
        return dict.fromkeys(self.context.ranks, factors)
