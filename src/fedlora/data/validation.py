"""Validation records: a seeded fraction of every client's records, held out of its training.

Tuning (a sweep choosing a learning rate) must not look at the test set, so it needs data of
its own that no client trains on. Each client gives up ``fraction`` of its records, at least
one, chosen by a generator seeded from the run's seed and the client's position in client
order: the server and a Flower SuperNode holding that client's file draw the same records,
and a resumed run draws what the interrupted one drew.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fedlora.data.records import AnyRecord, DataError


def validation_count(size: int, fraction: float) -> int:
    """Records a client of ``size`` records holds out: ``fraction`` of them, at least one (none
    when ``fraction`` is 0)."""
    return max(1, round(fraction * size)) if fraction > 0 else 0


def hold_out(records: Sequence[AnyRecord], fraction: float, seed: int, index: int,
             client: str | None = None) -> tuple[list[AnyRecord], list[AnyRecord]]:
    """(training, validation) records of the client at ``index`` in client order; both keep
    the records' order. ``client`` names it in the error when it is too small to split."""
    count = validation_count(len(records), fraction)
    if count and count >= len(records):
        raise DataError(f"client {client if client is not None else index}",
                        f"has {len(records)} record(s): holding {count} out for validation would leave "
                        "none to train on (lower 'validation_fraction' or set it to 0)")
    held = set(random.Random(f"{seed}/validation/{index}").sample(range(len(records)), count))
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def split_clients(clients: dict[str, list[AnyRecord]], fraction: float,
                  seed: int) -> tuple[dict[str, list[AnyRecord]], list[AnyRecord]]:
    """Every client's training records, and all clients' validation records pooled in client order."""
    training: dict[str, list[AnyRecord]] = {}
    validation: list[AnyRecord] = []
    for index, (client, records) in enumerate(clients.items()):
        training[client], held = hold_out(records, fraction, seed, index, client)
        validation += held
    return training, validation
