"""`fedlora run --runtime flower`: the run on Flower's Deployment Engine.

Without ``superlink`` a SuperLink and one SuperNode per client are started on 127.0.0.1 and
stopped afterwards, also on Ctrl-C, SIGTERM or error; with it, the app is submitted to that
existing deployment, whose SuperNodes must be started with this run's node configs.
"""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from fedlora.data import client_files
from fedlora.engine.config import RunConfig, check_client_count
from fedlora.engine.rows import read_rows
from fedlora.engine.setup import load_client_records, resolve_data_paths
from fedlora.runtime.flower.settings import AppSettings, NodeSettings
from fedlora.runtime.flower.deployment import LocalDeployment, connect
from fedlora.runtime.observer import RunObserver



def node_settings(config: RunConfig) -> list[NodeSettings]:
    """One SuperNode per client: its own file for a client folder, else its partition index.

    Loads the clients' records first, so bad data fails here, before any process starts.
    With ``data_on_nodes`` the SuperNodes (of a SuperLink started elsewhere) hold the data: none.
    """
    if config.data_on_nodes:
        check_client_count(config, config.clients)
        return []
    client_ids = list(load_client_records(config))
    check_client_count(config, len(client_ids))
    if Path(config.data).is_dir():
        files = client_files(Path(config.data))
        return [NodeSettings(i, data=str(files[cid].resolve())) for i, cid in enumerate(client_ids)]
    return [NodeSettings(i) for i in range(len(client_ids))]


def threads_per_node(config: RunConfig, num_nodes: int) -> int:
    """Intra-op threads for each SuperNode on this machine: its cores shared among the nodes
    that train at once, so that they do not oversubscribe them (at least one each)."""
    training_at_once = min(num_nodes, config.sampled_per_round(num_nodes))
    return max(1, (os.cpu_count() or 1) // max(1, training_at_once))


def node_gpus(config: RunConfig) -> list[str]:
    """The GPUs a local deployment spreads its SuperNodes over: every one this process sees (as
    CUDA_VISIBLE_DEVICES names them, where it is set), if the run is on CUDA; else none."""
    import torch

    count = torch.cuda.device_count()
    device = config.device or ("cuda" if count else "cpu")
    if not device.startswith("cuda"):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [name.strip() for name in visible.split(",")] if visible else [str(i) for i in range(count)]
    return names[:count]


def app_settings(config: RunConfig, run_dir: Path) -> AppSettings:
    return AppSettings(run_dir=str(run_dir.resolve()),
                       federation_factory="fedlora.runtime.flower.server_factory:federation_factory",
                       client_factory="fedlora.runtime.flower.client_factory:client_factory",
                       round_timeout=config.client_timeout,
                       run_config=json.dumps(config.to_dict()))


@contextmanager
def sigterm_as_interrupt():
    """Let SIGTERM unwind like Ctrl-C, so every process this run started is stopped."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class RowFollower:
    """Hands each row the ServerApp appends to the run's metrics.jsonl to an observer, once: the
    launcher's console and trackers see a Flower run's rounds as they finish."""

    def __init__(self, run_dir: Path, observer: RunObserver):
        self.run_dir = run_dir
        self.observer = observer
        self.reported = {row.round for row in read_rows(run_dir)}  # a resumed run's rounds were seen

    def __call__(self) -> None:
        for row in read_rows(self.run_dir):
            if row.round not in self.reported:
                self.reported.add(row.round)
                self.observer.round_finished(row)


def run_flower(config: RunConfig, run_dir: Path, observer: RunObserver | None = None) -> dict:
    """Run (or resume) the federation on Flower; returns the Federation's summary."""
    observer = observer or RunObserver()
    config = resolve_data_paths(config, observer.log)
    nodes = node_settings(config)
    settings = app_settings(config, run_dir)
    app_dir = run_dir / "flower-app"
    follow = RowFollower(run_dir, observer)
    with sigterm_as_interrupt():
        if config.superlink:
            observer.log(f"submitting to the SuperLink at {config.superlink}")
            outcome = connect(run_dir, config.superlink, root_certificates=config.root_certificates).run_app(
                app_dir, settings, while_waiting=follow)
        else:
            threads, gpus = threads_per_node(config, len(nodes)), node_gpus(config)
            observer.log(f"starting a SuperLink and {len(nodes)} SuperNodes on 127.0.0.1, {threads} "
                         f"thread{'s' if threads > 1 else ''} each"
                         + (f", spread over GPUs {','.join(gpus)}" if gpus else "") + f" (logs in {run_dir / 'logs'})")
            nodes = [replace(node, threads=threads) for node in nodes]
            with LocalDeployment(run_dir, len(nodes), nodes, gpus=gpus) as deployment:
                outcome = deployment.run_app(app_dir, settings, while_waiting=follow)
    follow()  # the rows written between the last look and the end
    for failure in outcome["flower"].get("sync_failures", []):
        observer.log(f"final sync: client {failure['client_id']} failed: {failure['reason']}")
    return outcome["summary"]
