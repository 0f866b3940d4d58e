"""A SuperNode lost mid-run on Flower's Deployment Engine: recorded as a failure, the run finishes.

Its own module so that, with the suite's files spread over workers, its Flower processes run
beside the other Flower modules' rather than after them.
"""

from __future__ import annotations

import json
import time

import pytest

from fedlora.engine.metrics import read_metrics
from fedlora.runtime.flower import runner

from support import flower_run, no_process_of, write_clients

pytestmark = pytest.mark.slow


def test_a_supernode_killed_mid_run_is_recorded_and_the_run_finishes(tmp_path, monkeypatch):
    client_dir, run_dir = write_clients(tmp_path / "clients", sizes=(8, 12)), tmp_path / "killed"
    deployments = []
    original = runner.LocalDeployment

    def recording(*args, **kwargs):
        deployments.append(original(*args, **kwargs))
        return deployments[-1]
    monkeypatch.setattr(runner, "LocalDeployment", recording)

    def kill_node_1_when_it_takes_round_1():  # its train message has logged the catch-up, not yet trained
        while not any(run_dir.glob("nodes/1/run-*/replica.json")):
            time.sleep(0.1)
        deployments[0].kill_node(1)

    # one round: each round a dead node is asked in, waiting client_timeout for it, which must
    # also cover the live clients' ClientApp processes on a loaded machine; the final sync does
    # not send it anything, so does not wait for it
    flower_run(client_dir, run_dir, on_started=kill_node_1_when_it_takes_round_1, rounds=1, fraction=1.0,
               ranks=[4, 2], local_steps=1, min_clients=1, client_timeout=60.0)
    rows = read_metrics(run_dir)
    assert [row["round"] for row in rows] == [0, 1]
    assert rows[1]["clients"] == ["0"] and not rows[1]["skipped"]
    assert [failure["client_id"] for failure in rows[1]["failures"]] == ["1"]
    sync_failures = json.loads((run_dir / "flower-run.json").read_text())["flower"]["sync_failures"]
    assert [(failure["client_id"], failure["reason"]) for failure in sync_failures] == [
        ("1", "sync: not sent, its round-1 task went unanswered")]
    assert no_process_of(run_dir)
