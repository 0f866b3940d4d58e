"""Local-only training: the baseline of no federation at all."""

from __future__ import annotations

from torch import Tensor

from fedlora.aggregation.factors import ClientUpdate, GlobalUpdate, LoraFactors, MethodState, factors_to_tensors, \
    tensors_to_factors
from fedlora.aggregation.method import Aggregator


class LocalOnly(Aggregator):
    """baseline: every client trains alone, no aggregation; the mean of the clients' own models is reported.

    Each client continues its own adapter round after round (a client not yet sampled starts
    fresh). There is no global model: every client's model is evaluated, and their mean.
    """

    name = "local"
    exact = None
    sends = "— (nothing leaves a client)"
    receives = "—"
    personalised = True

    def setup(self, context) -> None:
        super().setup(context)
        self.adapters: dict[str, dict[str, LoraFactors]] = {}

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        return GlobalUpdate(factors={}, merge=False, client_factors={u.client_id: u.factors for u in updates})

    def start_adapter(self, client_id: str, server_round: int) -> dict[str, LoraFactors] | None:
        return self.adapters.get(client_id)

    def commit(self, server_round: int, update: GlobalUpdate) -> None:
        self.adapters.update(update.client_factors)

    def evaluation_adapters(self) -> dict[str | None, dict[str, LoraFactors] | None]:
        return {client_id: self.adapters.get(client_id) for client_id in self.context.ranks}

    def state_dict(self) -> MethodState:
        tensors = {}
        for client_id, factors in self.adapters.items():
            tensors.update(factors_to_tensors(f"local/{client_id}/", factors))
        return {"clients": sorted(self.adapters)}, tensors

    def load_state_dict(self, state: MethodState) -> None:
        meta, tensors = state
        self.adapters = {cid: tensors_to_factors(f"local/{cid}/", tensors) for cid in meta["clients"]}
