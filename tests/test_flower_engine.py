"""The real engine on Flower's Deployment Engine: a SuperLink and SuperNodes on loopback."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from fedlora.engine.client import LocalTrainer
from fedlora.engine.config import save_config
from fedlora.engine.restore import restore_global_model
from fedlora.eval.loss import pad_token_id
from fedlora.models import load_model
from fedlora.engine.metrics import read_metrics
from fedlora.runtime.flower import runner
from fedlora.runtime.flower.client_app import ReplicaLog

from support import comparable, run_tiny, tiny_config

pytestmark = pytest.mark.slow
SETTINGS = {"rounds": 2, "fraction": 2 / 3, "ranks": [4, 2, 1], "local_steps": 1, "min_clients": 1}


def replica_weights(node_dir: Path, modules: list[str]) -> dict[str, torch.Tensor]:
    """A SuperNode's replica rebuilt from its log, exactly as its ClientApp rebuilds it."""
    (run_state,) = node_dir.glob("run-*")
    model, tokenizer = load_model("tiny-llama")
    trainer = LocalTrainer(model, pad_token_id(tokenizer), target_modules=["q_proj", "v_proj"], batch_size=2)
    ReplicaLog(run_state).replay(trainer)
    return {name: trainer.model.get_submodule(name).weight.detach() for name in modules}


def no_process_of(run_dir: Path) -> bool:
    return subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True).stdout == b""


def flower_run(client_dir: Path, run_dir: Path, on_started=None, **overrides) -> dict:
    config = tiny_config(client_dir, run_dir, runtime="flower", **{**SETTINGS, **overrides})
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / "config.json")
    if on_started is not None:
        threading.Thread(target=on_started, daemon=True).start()
    return runner.run_flower(config, run_dir)


def test_flower_run_equals_the_in_process_run_and_every_replica_the_server(client_dir, tmp_path):
    summary = flower_run(client_dir, tmp_path / "flower")
    expected = run_tiny(client_dir, tmp_path / "inprocess", **SETTINGS)
    assert comparable(read_metrics(tmp_path / "flower")) == comparable(expected)
    assert summary["rounds"] == 2

    server = restore_global_model(tmp_path / "flower").global_model.adapted_weights()
    reference = restore_global_model(tmp_path / "inprocess").global_model.adapted_weights()
    for name, weight in server.items():
        assert (weight - reference[name]).abs().max() <= 1e-6, name
    for node in range(3):
        replica = replica_weights(tmp_path / "flower" / "nodes" / str(node), list(server))
        for name, weight in server.items():
            assert torch.equal(replica[name], weight), (node, name)
    assert no_process_of(tmp_path / "flower")


def test_a_supernode_killed_mid_run_is_recorded_and_the_run_finishes(client_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "killed"
    deployments = []
    original = runner.LocalDeployment

    def recording(*args, **kwargs):
        deployments.append(original(*args, **kwargs))
        return deployments[-1]
    monkeypatch.setattr(runner, "LocalDeployment", recording)

    def kill_node_2_after_round_1():
        while not any(row["round"] == 1 for row in read_metrics(run_dir)):
            time.sleep(0.2)
        deployments[0].kill_node(2)

    flower_run(client_dir, run_dir, on_started=kill_node_2_after_round_1, fraction=1.0, client_timeout=40.0)
    rows = read_metrics(run_dir)
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert rows[1]["clients"] == ["0", "1", "2"]
    assert rows[2]["clients"] == ["0", "1"] and not rows[2]["skipped"]
    assert [failure["client_id"] for failure in rows[2]["failures"]] == ["2"]
    assert no_process_of(run_dir)
