"""A run's state, checkpointed after every round and loaded on resume: one entry per part.

Each part (the global model, the method, the ledger, the rows, the privacy ledgers, what a
runtime keeps) gives its state as (JSON metadata, tensors) and takes it back. A checkpoint
(engine/checkpoint.py: atomic, durable) holds every part's metadata under its name and its
tensors under ``<name>/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from fedlora.aggregation import Aggregator, MethodState, RunContext
from fedlora.engine.checkpoint import load_latest_checkpoint, save_checkpoint, with_prefix


class Stateful(Protocol):
    def state_dict(self) -> MethodState: ...

    def load_state_dict(self, state: MethodState) -> None: ...


class MethodPart:
    """A method's checkpointed state together with the run context it was set up with, so that a
    run folder's method can be rebuilt without its data (``fedlora eval``, ``export``)."""

    def __init__(self, method: Aggregator):
        self.method = method

    def state_dict(self) -> MethodState:
        meta, tensors = self.method.state_dict()
        return {"context": asdict(self.method.context), "state": meta}, tensors

    def load_state_dict(self, state: MethodState) -> None:
        meta, tensors = state
        self.method.load_state_dict((meta["state"], tensors))

    @staticmethod
    def context(meta: dict) -> RunContext:
        return RunContext(**meta["context"])


class RunState:
    """The parts of one run folder's state; :meth:`save` after a round, :meth:`restore` on resume."""

    def __init__(self, run_dir: Path | str, parts: Mapping[str, Stateful], device: torch.device | str = "cpu"):
        self.run_dir = Path(run_dir)
        self.parts = dict(parts)
        self.device = device

    def save(self, completed_round: int) -> None:
        meta: dict = {"completed_round": completed_round}
        tensors: dict[str, Tensor] = {}
        for name, part in self.parts.items():
            meta[name], part_tensors = part.state_dict()
            tensors.update({f"{name}/{key}": tensor for key, tensor in part_tensors.items()})
        save_checkpoint(self.run_dir, completed_round, meta, tensors)

    def restore(self) -> int | None:
        """Load every part from the newest checkpoint; its completed round, or None without one."""
        loaded = load_latest_checkpoint(self.run_dir, device=self.device)
        if loaded is None:
            return None
        meta, tensors = loaded
        for name, part in self.parts.items():
            part.load_state_dict((meta.get(name), with_prefix(f"{name}/", tensors)))
        return meta["completed_round"]

