"""FedSA-LoRA: clients train A and B, share only A; each client keeps its own B across rounds."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from fedlora.aggregation.base import Aggregator, ClientUpdate, GlobalUpdate, LoraFactors, check_updates, \
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

    What the engine must provide (methods and attributes below): clients upload only
    :attr:`uploaded` and keep :attr:`kept_on_client` as client state (checkpointed, resumed,
    held on the SuperNode under Flower); :meth:`client_start` joins the two; evaluation is of
    the personalised models (``client_factors``: each reporting client's (Ā, B_k)) and
    their mean, as for ``local``. Until client state exists, the server keeps each client's last B
    on its behalf (:attr:`kept`, saved by :meth:`state_dict`), and ``factors`` holds Ā with
    the round's mean B̄ = Σ p_k B_k: the single model a runtime that evaluates one global
    adapter shows (FedSA-LoRA itself never forms it).
    """

    name = "fedsa"
    heterogeneous_ranks = False
    #: the factors a client sends to the server
    uploaded: ClassVar[frozenset[str]] = frozenset({"A"})
    #: the factors each client keeps across rounds and never sends
    kept_on_client: ClassVar[frozenset[str]] = frozenset({"B"})
    #: evaluated: each client's own model (``client_factors``) and their mean, not one global model
    evaluates_clients: ClassVar[bool] = True

    def __init__(self):
        #: client → module → its B after its last round (stand-in for state held by the client)
        self.kept: dict[str, dict[str, Tensor]] = {}

    def aggregate(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                  server_round: int | None = None) -> GlobalUpdate:
        check_updates(updates)
        require_unique_clients(updates)
        weights = normalized(example_weights(updates, weights))
        shared: dict[str, LoraFactors] = {}
        for module in updates[0].factors:
            require_homogeneous(updates, module, self.name)
            shared[module] = average_factors([update.factors[module] for update in updates], weights)
        personal = {update.client_id: {module: LoraFactors(A=shared[module].A, B=factors.B, scale=factors.scale)
                                       for module, factors in update.factors.items()}
                    for update in updates}
        self.kept.update({cid: {module: factors.B for module, factors in models.items()}
                          for cid, models in personal.items()})
        return GlobalUpdate(factors=shared, merge=False, client_factors=personal)

    def client_start(self, global_update: GlobalUpdate, client_id: str,
                     rank: int) -> dict[str, LoraFactors] | None:
        """(Ā, B_k): the global A with the client's own B, or a zero B before it has trained."""
        kept = self.kept.get(client_id, {})
        return {module: LoraFactors(A=factors.A, B=kept[module] if module in kept else
                                    factors.B.new_zeros(factors.B.shape), scale=factors.scale)
                for module, factors in global_update.factors.items()}

    def state_dict(self) -> dict[str, Tensor]:
        """The kept B's as flat tensors, ``"<client>/<module>"`` → B (for a checkpoint)."""
        return {f"{cid}/{module}": B for cid, modules in self.kept.items() for module, B in modules.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.kept = {}
        for key, B in state.items():
            cid, module = key.rsplit("/", 1)  # module names have no "/"; client ids may
            self.kept.setdefault(cid, {})[module] = B

