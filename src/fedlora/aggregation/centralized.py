"""Centralized training: the upper baseline of one client holding every client's records."""

from __future__ import annotations

from fedlora.aggregation.flora import FLoRA


class Centralized(FLoRA):
    """baseline: one client holding all data, same total steps.

    The engine pools every client's records into one client of the largest rank, sampled every
    round, which trains the steps all sampled clients together train in a federated round. Its
    one update is aggregated (trivially, exactly) by FLoRA. It needs every record in one place,
    so it runs in-process only.
    """

    name = "centralized"
    pools_data = True
    runtimes = ("inprocess",)
