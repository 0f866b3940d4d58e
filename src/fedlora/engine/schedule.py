"""Whom each round samples and how many steps a client takes: the run's schedule, fixed by its
configuration and seed, so differential privacy can be calibrated on it before any round runs."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from fedlora.engine.config import RunConfig
from fedlora.engine.seeding import derive_seed


@dataclass(frozen=True)
class Schedule:
    config: RunConfig
    #: every client's number of training records (None where the server does not know it)
    client_sizes: dict[str, int | None]

    @property
    def client_ids(self) -> list[str]:
        return list(self.client_sizes)

    def sample(self, server_round: int) -> list[str]:
        """The clients of ``server_round``, in client order: a seeded draw of the configured count."""
        count = self.config.sampled_per_round(len(self.client_sizes))
        rng = random.Random(derive_seed(self.config.seed, "sample", server_round))
        chosen = set(rng.sample(self.client_ids, count))
        return [cid for cid in self.client_ids if cid in chosen]

    def local_steps(self, client_id: str) -> int:
        if self.config.local_steps is not None:
            return self.config.local_steps
        per_step = self.config.batch_size * self.config.grad_accum
        return max(1, math.ceil(self.config.local_epochs * self.client_sizes[client_id] / per_step))

    def client_shares(self) -> dict[str, float]:
        """Every client's share of the records (equal shares where sizes are unknown)."""
        sizes = self.client_sizes if None not in self.client_sizes.values() else dict.fromkeys(self.client_sizes, 1)
        total = sum(sizes.values())
        return {cid: size / total for cid, size in sizes.items()}
