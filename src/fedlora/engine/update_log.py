"""Global updates kept on disk, one safetensors file per round.

The server logs the base merges here so that a replica that missed rounds (a Flower node not
sampled, or restarted empty) can catch up, without holding every round in memory or writing
them all into every checkpoint; a Flower node logs the merges it received the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from fedlora.aggregation import GlobalUpdate
from fedlora.aggregation import factors_to_tensors, tensors_to_factors
from fedlora.engine.checkpoint import unshared
from fedlora.files import fsync_path


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
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(server_round)
        tmp = path.with_name(f".tmp-{path.name}")
        tensors = {**factors_to_tensors("factors/", update.factors),
                   **factors_to_tensors("residual/", update.residual)}
        save_file(unshared(tensors), tmp, metadata={"merge": json.dumps(update.merge)})
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(self.directory)

    def load(self, server_round: int) -> GlobalUpdate:
        with safe_open(self.path(server_round), framework="pt") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}
            merge = json.loads(file.metadata()["merge"])
        return GlobalUpdate(factors=tensors_to_factors("factors/", tensors), merge=merge,
                            residual=tensors_to_factors("residual/", tensors))

    def delete(self, rounds: Iterable[int]) -> None:
        for server_round in rounds:
            self.path(server_round).unlink(missing_ok=True)
