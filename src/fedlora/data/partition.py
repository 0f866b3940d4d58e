"""Which records each federated client trains on.

Either the data already comes split (a directory of ``local_training_<n>.json`` files, as
FLoRA ships Dolly) or one dataset is split here with Flower Datasets' partitioners: IID, or
label-skewed Dirichlet over a top-level field of the records (``category`` by default), which
works alike for instruction records and conversations.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np

from fedlora.data.records import JSON_SUFFIXES, AnyRecord, DataError, LoadReport, load_records, \
    load_records_with_report

PARTITIONS = ("dirichlet", "iid")
CLIENT_FILE = re.compile(r"local_training_(\d+)\.jsonl?")


def load_clients(source: str | Path, *, num_clients: int = 10, partition: str = "dirichlet",
                 alpha: float = 0.5, min_size: int = 10, seed: int = 0,
                 by: str = "category") -> dict[str, list[AnyRecord]]:
    """Client id -> that client's records.

    A directory of ``local_training_<n>.json`` (or ``.jsonl``) files gives one client per file, id ``"<n>"``,
    in numeric order; the split arguments are then unused since the files are the split.
    A single file or Hub id is split into ``num_clients`` clients ``"0"``, ``"1"``, … of at
    least ``min_size`` records each, the same way for the same ``seed``.
    """
    path = Path(source)
    if path.is_dir():
        return _clients_from_directory(path)
    report = load_records_with_report(source, label_field=by if partition == "dirichlet" else None)
    _check_split(report.source, len(report.records), num_clients, partition, alpha, min_size)
    if partition == "iid":
        rows = _iid_rows(len(report.records), num_clients, seed)
    else:
        rows = _dirichlet_rows(report, num_clients, alpha, min_size, seed, by)
    return {str(client): [report.records[row] for row in client_rows]
            for client, client_rows in enumerate(rows)}


def centralize(clients: dict[str, list[AnyRecord]]) -> list[AnyRecord]:
    """All clients' records in one list (client order), for the centralised baseline."""
    return [record for records in clients.values() for record in records]


def client_files(directory: Path) -> dict[str, Path]:
    """Client id -> its ``local_training_<n>.json`` (or ``.jsonl``) file, in numeric order."""
    files = sorted(file for file in Path(directory).glob("local_training_*") if file.suffix in JSON_SUFFIXES)
    if not files:
        raise DataError(Path(directory).name, "has no local_training_<n>.json client files")
    numbered: dict[str, Path] = {}
    for file in files:
        match = CLIENT_FILE.fullmatch(file.name)
        if match is None:
            raise DataError(file.name, "client files must be named local_training_<n>.json (or .jsonl) "
                                       "with <n> a number")
        if match[1] in numbered:
            raise DataError(file.name, f"client {match[1]} has a second file, {numbered[match[1]].name}")
        numbered[match[1]] = file
    return dict(sorted(numbered.items(), key=lambda item: int(item[0])))


def _clients_from_directory(directory: Path) -> dict[str, list[AnyRecord]]:
    return {client_id: load_records(file) for client_id, file in client_files(directory).items()}


def _check_split(source: str, size: int, num_clients: int, partition: str, alpha: float,
                 min_size: int) -> None:
    if partition not in PARTITIONS:
        raise DataError(source, f"unknown partition {partition!r} "
                                f"(expected {' or '.join(map(repr, PARTITIONS))})")
    if num_clients < 1:
        raise DataError(source, f"num_clients must be at least 1, got {num_clients}")
    if min_size < 1:  # an empty client would have nothing to train on
        raise DataError(source, f"min_size must be at least 1, got {min_size}")
    if partition == "dirichlet" and not (math.isfinite(alpha) and alpha > 0):
        raise DataError(source, f"Dirichlet alpha must be a positive number, got {alpha}")
    if size < num_clients * min_size:
        raise DataError(source, f"{size} records cannot give {num_clients} clients "
                                f"at least {min_size} records each")


def _iid_rows(size: int, num_clients: int, seed: int) -> list[list[int]]:
    from flwr_datasets.partitioner import IidPartitioner  # imports matplotlib: only where splitting

    # IidPartitioner cuts contiguous shards, so the rows are shuffled first
    shuffled = np.random.default_rng(seed).permutation(size).tolist()
    return _partition_rows(IidPartitioner(num_partitions=num_clients), {"row": shuffled})


def _dirichlet_rows(report: LoadReport, num_clients: int, alpha: float, min_size: int, seed: int,
                    by: str) -> list[list[int]]:
    source = report.source
    if report.unlabelled:
        raise DataError(source, f"{len(report.unlabelled)} of {len(report.records)} records have no {by!r} "
                                f"(the first: {report.unlabelled[0]}), which partition='dirichlet' needs "
                                "(name another field in partition_by, or use partition='iid')")
    from flwr_datasets.partitioner import DirichletPartitioner  # imports matplotlib: only where splitting

    partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by="label",
                                       alpha=alpha, min_partition_size=min_size, seed=seed)
    try:
        with warnings.catch_warnings():
            # it warns on every resampling; if all attempts fail we say so below
            warnings.simplefilter("ignore")
            return _partition_rows(partitioner, {"row": list(range(len(report.records))),
                                                 "label": report.labels})
    except ValueError as error:
        raise DataError(source, f"Dirichlet split (alpha={alpha}) gave a client fewer than "
                                f"{min_size} records: raise alpha or lower min_size "
                                f"({error})") from error


def _partition_rows(partitioner, columns: dict[str, list]) -> list[list[int]]:
    """The ``row`` column of every partition the partitioner cuts from ``columns``."""
    import datasets  # imported when used: local client files need neither it nor the split

    partitioner.dataset = datasets.Dataset.from_dict(columns)
    return [partitioner.load_partition(client)["row"]
            for client in range(partitioner.num_partitions)]
