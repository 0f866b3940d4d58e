"""The clients' own models, for a personalised method: what each client keeps, and their evaluation.

The one interface every runtime implements once. Factors a method keeps on its clients (its
:attr:`~fedlora.aggregation.Aggregator.kept_on_client`) live in each client's :class:`ClientStore`, never sent: the runtime that holds
the clients holds their stores (the in-process runtime in the run folder's ``client-state/``,
a Flower SuperNode in its state dir), trains each client from its store
(:func:`train_from_store`) and evaluates each client's own model where it lives
(:class:`ClientModels`). An entry is one safetensors file per client and round, written
atomically and durably. Training round r starts from the client's newest entry of an earlier
round and writes entry r, so a round redone after a crash or a ``--resume`` starts from the
same factors as its first attempt; a client keeps that entry and its newest, no more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from safetensors.torch import load_file
from torch import Tensor

from fedlora.aggregation import LoraFactors
from fedlora.engine.checkpoint import atomic_save_tensors
from fedlora.engine.task import ClientResult, ClientTask

#: the run folder's (or a SuperNode's run state's) folder of client stores
CLIENT_STATE_DIR = "client-state"

Adapter = dict[str, LoraFactors] | None


class ClientStore:
    """``<directory>/<client>/round-<r>.safetensors``: the kept factors, keyed ``<factor>/<module>``."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)

    def path(self, client_id: str, server_round: int) -> Path:
        return self.directory / client_id / f"round-{server_round:06d}.safetensors"

    def rounds(self, client_id: str) -> list[int]:
        return sorted(int(path.stem.removeprefix("round-"))
                      for path in (self.directory / client_id).glob("round-*.safetensors"))

    def load(self, client_id: str, through: int) -> dict[str, dict[str, Tensor]]:
        """Module → factor → tensor of the client's newest entry of a round ≤ ``through``; {} if none."""
        rounds = [r for r in self.rounds(client_id) if r <= through]
        if not rounds:
            return {}
        kept: dict[str, dict[str, Tensor]] = {}
        for key, tensor in load_file(self.path(client_id, rounds[-1])).items():
            name, module = key.split("/", 1)
            kept.setdefault(module, {})[name] = tensor
        return kept

    def save(self, client_id: str, server_round: int, factors: dict[str, LoraFactors], names: frozenset[str]) -> None:
        """Keep the ``names`` factors of what the client trained in ``server_round``; drop the
        entries older than the one that round started from."""
        atomic_save_tensors(self.path(client_id, server_round),
                            {f"{name}/{module}": getattr(f, name) for module, f in factors.items() for name in names})
        earlier = [r for r in self.rounds(client_id) if r < server_round]
        for old in earlier[:-1]:
            self.path(client_id, old).unlink(missing_ok=True)

    def discard_after(self, server_round: int) -> None:
        """Drop every entry of a round after ``server_round``: a resumed run redoes those rounds."""
        for folder in self.directory.glob("*/"):
            for later in (r for r in self.rounds(folder.name) if r > server_round):
                self.path(folder.name, later).unlink(missing_ok=True)

    def personalised(self, client_id: str, through: int, adapter: Adapter) -> Adapter:
        """``adapter`` with the client's own factors of its newest entry ≤ ``through``, or as it
        is where the client has none yet (a fresh LoRA's B is the zero the server sends; None:
        the base model)."""
        if adapter is None:
            return None
        kept = self.load(client_id, through)
        return {module: replace(f, **{name: tensor.to(getattr(f, name).device)
                                      for name, tensor in kept.get(module, {}).items()})
                for module, f in adapter.items()}


class ClientModels(Protocol):
    """Where a personalised method's client models live: each client's adapter as the server has
    it, completed with the ``kept`` factors from its store and evaluated there; ``evaluate_here``
    evaluates an adapter on the server's model. A client not evaluated is left out."""

    def evaluate(self, server_round: int, adapters: dict[str, Adapter], kept: frozenset[str],
                 evaluate_here: Callable[[Adapter], dict]) -> dict[str, dict]: ...


class StoredClientModels:
    """Clients whose stores are in reach (one process, the run folder's): each client's model is
    its adapter completed from its store, evaluated here."""

    def __init__(self, store: ClientStore):
        self.store = store

    def evaluate(self, server_round: int, adapters: dict[str, Adapter], kept: frozenset[str],
                 evaluate_here: Callable[[Adapter], dict]) -> dict[str, dict]:
        return {cid: evaluate_here(self.store.personalised(cid, server_round, adapter))
                for cid, adapter in adapters.items()}


def mean_over_clients(per_client: dict[str, dict]) -> dict:
    """The clients' numeric metrics averaged, beside each client's own (``per_client``)."""
    if not per_client:
        return {}
    numeric = [key for key, value in next(iter(per_client.values())).items() if isinstance(value, (int, float))]
    return {**{key: sum(m[key] for m in per_client.values()) / len(per_client) for key in numeric},
            "per_client": per_client}


def train_from_store(train: Callable[[ClientTask], ClientResult], store: ClientStore,
                     task: ClientTask) -> ClientResult:
    """``train(task)`` with the factors the method keeps on the client taken from its store,
    then keep what it trained of them. A task with nothing kept is trained as it is."""
    kept = task.plan.kept
    if not kept:
        return train(task)
    start = store.personalised(task.client_id, task.server_round - 1, task.plan.start)
    result = train(replace(task, plan=replace(task.plan, start=start)))
    store.save(task.client_id, task.server_round, result.update.factors, kept)
    return result
