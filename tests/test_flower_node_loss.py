"""A SuperNode lost mid-run on Flower's Deployment Engine: recorded as a failure, the run finishes.

Its own module so that, with the suite's files spread over workers, its Flower processes run
beside the other Flower modules' rather than after them.
"""

from __future__ import annotations

import time

import pytest

from fedlora.engine.metrics import read_metrics
from fedlora.runtime.flower import runner

from support import flower_run, no_process_of

pytestmark = pytest.mark.slow


def test_a_supernode_killed_mid_run_is_recorded_and_the_run_finishes(client_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "killed"
    deployments = []
    original = runner.LocalDeployment

    def recording(*args, **kwargs):
        deployments.append(original(*args, **kwargs))
        return deployments[-1]
    monkeypatch.setattr(runner, "LocalDeployment", recording)

    def kill_node_2_when_it_takes_round_1():  # its train message has logged the catch-up, not yet trained
        while not any(run_dir.glob("nodes/2/run-*/replica.json")):
            time.sleep(0.1)
        deployments[0].kill_node(2)

    # one round: each round a dead node is asked in, and the final sync, waits client_timeout for it
    flower_run(client_dir, run_dir, on_started=kill_node_2_when_it_takes_round_1, rounds=1, fraction=1.0,
               ranks=[4, 2, 1], local_steps=1, min_clients=1, client_timeout=25.0)
    rows = read_metrics(run_dir)
    assert [row["round"] for row in rows] == [0, 1]
    assert rows[1]["clients"] == ["0", "1"] and not rows[1]["skipped"]
    assert [failure["client_id"] for failure in rows[1]["failures"]] == ["2"]
    assert no_process_of(run_dir)
