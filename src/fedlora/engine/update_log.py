"""Global updates kept on disk, one safetensors file per round.

The server logs the base merges here so that a replica that missed rounds (a Flower node not
sampled, or restarted empty) can catch up, without holding every round in memory or writing
them all into every checkpoint; a Flower node logs the merges it received the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from safetensors import safe_open

from fedlora.aggregation import GlobalUpdate
from fedlora.aggregation import factors_to_tensors, tensors_to_factors
from fedlora.engine.checkpoint import atomic_save_tensors


class UpdateLog:
    """``round-<r>.safetensors`` files in ``directory``: factors, residual and the merge flag."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)

    def path(self, server_round: int) -> Path:
        return self.directory / f"round-{server_round:06d}.safetensors"

    def rounds(self) -> list[int]:
        return sorted(int(path.stem.removeprefix("round-")) for path in self.directory.glob("round-*.safetensors"))

    def write(self, server_round: int, update: GlobalUpdate) -> None:
        """Write atomically and durably: once this returns, the round survives a crash."""
        tensors = {**factors_to_tensors("factors/", update.factors),
                   **factors_to_tensors("residual/", update.residual)}
        atomic_save_tensors(self.path(server_round), tensors, metadata={"merge": json.dumps(update.merge)})

    def load(self, server_round: int) -> GlobalUpdate:
        with safe_open(self.path(server_round), framework="pt") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}
            merge = json.loads(file.metadata()["merge"])
        return GlobalUpdate(factors=tensors_to_factors("factors/", tensors), merge=merge,
                            residual=tensors_to_factors("residual/", tensors))

    def delete(self, rounds: Iterable[int]) -> None:
        for server_round in rounds:
            self.path(server_round).unlink(missing_ok=True)
