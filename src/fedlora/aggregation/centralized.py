"""Centralized training: the upper baseline of one client holding every client's records."""

from __future__ import annotations

from dataclasses import replace

from fedlora.aggregation.flora import FLoRA
from fedlora.aggregation.method import RunShape, T


class Centralized(FLoRA):
    """baseline: one client holding all data, same total steps.

    :meth:`arrange` pools every client's records into one client of the largest rank, sampled
    every round, which trains the steps all sampled clients together train in a federated round.
    Its one update is aggregated (trivially, exactly) by FLoRA. It needs every record in one
    place, so it runs in-process only.
    """

    name = "centralized"
    paper = ""  # a baseline
    exact = True
    sends = "— (one client holds every record)"
    receives = "—"
    runtimes = ("inprocess",)

    @classmethod
    def arrange(cls, clients: dict[str, T], shape: RunShape) -> tuple[dict[str, T], RunShape]:
        steps = shape.local_steps * shape.clients_per_round if shape.local_steps is not None else None
        pooled = [record for records in clients.values() for record in records]
        return {cls.name: pooled}, replace(shape, ranks=[max(shape.ranks)], clients_per_round=1, local_steps=steps,
                                           min_clients=1)
