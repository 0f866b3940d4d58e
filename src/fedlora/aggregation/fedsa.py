"""FedSA-LoRA: clients train A and B, share only A; each client keeps its own B across rounds."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from fedlora.aggregation.base import Aggregator, ClientUpdate, GlobalUpdate, LoraFactors, MethodState, \
    example_weights
from fedlora.aggregation.factored import average_factors, normalized
from fedlora.aggregation.fedit import require_homogeneous
from fedlora.aggregation.flexlora import require_unique_clients


class FedSALoRA(Aggregator):
    """FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463): only A is sent and averaged; each client keeps its B.

    The paper finds A learns what clients share and B what is client-specific, so both are
    trained, only A is sent and averaged (weights: example shares, normalised, as the public
    code's FederatedScope FedAvg does), and client k starts each round from (Ā, B_k): the
    global A and its own B from its last round (zeros, as a fresh LoRA's B, before it has
    trained). One rank and one scale across clients: the paper and its code average A at a
    single rank.

    Evaluated are the personalised models, each client's (Ā, B_k), and their mean, as for
    ``local``. Not yet as the paper: fedlora evaluates on the server, so clients still send
    their B (the ledger counts it) and the server keeps each client's last B on its behalf
    (:attr:`kept`, checkpointed with the method's state); :attr:`uploaded` and
    :attr:`kept_on_client` say what a client-side store would change. ``factors`` holds Ā with
    the round's mean B̄ = Σ p_k B_k (FedSA-LoRA itself never forms it).
    """

    name = "fedsa"
    heterogeneous_ranks = False
    #: the factors a client sends to the server
    uploaded: ClassVar[frozenset[str]] = frozenset({"A"})
    #: the factors each client keeps across rounds and never sends
    kept_on_client: ClassVar[frozenset[str]] = frozenset({"B"})

    def __init__(self):
        #: client → module → its B after its last round (stand-in for state held by the client)
        self.kept: dict[str, dict[str, Tensor]] = {}

    def setup(self, context) -> None:
        super().setup(context)
        self.kept = {}

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        require_unique_clients(updates)
        weights = normalized(example_weights(updates, weights))
        shared: dict[str, LoraFactors] = {}
        for module in updates[0].factors:
            require_homogeneous(updates, module, self.name)
            shared[module] = average_factors([update.factors[module] for update in updates], weights)
        personal = {update.client_id: {module: LoraFactors(A=shared[module].A, B=factors.B, scale=factors.scale)
                                       for module, factors in update.factors.items()}
                    for update in updates}
        return GlobalUpdate(factors=shared, merge=False, client_factors=personal)

    def commit(self, server_round: int, update: GlobalUpdate) -> None:
        super().commit(server_round, update)
        self.kept.update({cid: {module: factors.B for module, factors in models.items()}
                          for cid, models in update.client_factors.items()})

    def client_start(self, global_update: GlobalUpdate, client_id: str,
                     rank: int) -> dict[str, LoraFactors] | None:
        """(Ā, B_k): the global A with the client's own B, or a zero B before it has trained."""
        kept = self.kept.get(client_id, {})
        return {module: LoraFactors(A=factors.A, B=kept[module] if module in kept else
                                    factors.B.new_zeros(factors.B.shape), scale=factors.scale)
                for module, factors in global_update.factors.items()}

    def evaluation_adapters(self) -> dict[str | None, dict[str, LoraFactors] | None]:
        """Every client's personalised model (a client not yet trained: Ā with a zero B)."""
        if self.global_update is None:
            return dict.fromkeys(self.context.ranks)
        return {cid: self.client_start(self.global_update, cid, rank) for cid, rank in self.context.ranks.items()}

    def state_dict(self) -> MethodState:
        """The default state plus the kept B's, ``kept/<client>/<module>`` → B."""
        meta, tensors = super().state_dict()
        tensors.update({f"kept/{cid}/{module}": B for cid, modules in self.kept.items() for module, B in modules.items()})
        return meta, tensors

    def load_state_dict(self, state: MethodState) -> None:
        super().load_state_dict(state)
        self.kept = {}
        for key, B in state[1].items():
            if key.startswith("kept/"):
                cid, module = key.removeprefix("kept/").rsplit("/", 1)  # module names have no "/"
                self.kept.setdefault(cid, {})[module] = B

