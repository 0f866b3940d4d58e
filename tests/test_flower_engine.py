"""The real engine on Flower's Deployment Engine: a SuperLink and SuperNodes on loopback.

`fedlora run --runtime flower` (the CLI, in a subprocess) whose launcher is SIGKILLed twice and
resumed ends where the same run in this process ends, with every replica equal to the server.
(The uninterrupted deployment is the other Flower modules' subject: test_flower_secure checks
its rounds against the in-process aggregate.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedlora.engine.client import LocalTrainer
from fedlora.engine.ledger import BYTES_PER_PARAM, factor_params
from fedlora.engine.restore import restore_global_model
from fedlora.engine.update_log import UpdateLog
from fedlora.eval.loss import pad_token_id
from fedlora.models import load_model
from fedlora.engine.metrics import read_metrics
from fedlora.runtime.flower.client_app import ReplicaLog
from fedlora.runtime.flower.deployment import MARKER_FILE, marked_processes

from support import comparable, no_process_of, run_tiny

pytestmark = pytest.mark.slow
SETTINGS = {"rounds": 2, "fraction": 2 / 3, "ranks": [4, 2, 1], "local_steps": 1, "min_clients": 1}
#: the same run as flags (support.tiny_config's defaults and SETTINGS)
FLAGS = ["--runtime", "flower", "--model", "tiny-llama", "--rounds", "2", "--fraction", str(2 / 3),
         "--ranks", "4,2,1", "--local-steps", "1", "--min-clients", "1", "--batch-size", "2",
         "--max-length", "48", "--lr", "0.01", "--dtype", "float32"]


def replica_weights(run_state: Path, modules: list[str]) -> dict[str, torch.Tensor]:
    """A SuperNode's replica rebuilt from its log, exactly as its ClientApp rebuilds it."""
    model, tokenizer = load_model("tiny-llama")
    trainer = LocalTrainer(model, pad_token_id(tokenizer), target_modules=["q_proj", "v_proj"], batch_size=2)
    ReplicaLog(run_state).replay(trainer)
    return {name: trainer.model.get_submodule(name).weight.detach() for name in modules}


def assert_replicas_equal_the_server(run_dir: Path) -> None:
    """Every node's replica of the run's last Flower run (the one whose ServerApp log was kept)."""
    (server_log,) = (run_dir / "logs").glob("serverapp-*.log")
    flower_run = server_log.stem.removeprefix("serverapp-")
    server = restore_global_model(run_dir).global_model.adapted_weights()
    for node in range(3):
        replica = replica_weights(run_dir / "nodes" / str(node) / f"run-{flower_run}", list(server))
        for name, weight in server.items():
            assert torch.equal(replica[name], weight), (node, name)


def fedlora(*args, log: Path) -> subprocess.Popen:
    """`fedlora ARGS` in a process of its own, output to ``log``."""
    with open(log, "ab") as output:
        return subprocess.Popen([sys.executable, "-c", "from fedlora.cli import app; app()", *map(str, args)],
                                stdout=output, stderr=subprocess.STDOUT)


def kill_when(launcher: subprocess.Popen, moment: Callable[[], bool], what: str) -> None:
    """SIGKILL the launcher as soon as ``moment()`` holds, as a crash of the server machine's
    main process would; it must not have finished before."""
    while not moment():
        assert launcher.poll() is None, f"the run ended ({launcher.returncode}) before {what}"
        time.sleep(0.1)
    launcher.send_signal(signal.SIGKILL)
    assert launcher.wait() == -signal.SIGKILL


def rows_written(run_dir: Path) -> int:
    """Complete lines of metrics.jsonl (one being appended is not counted)."""
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def replica_rounds(run_dir: Path) -> list[int]:
    return [json.loads(path.read_text())["through"] for path in run_dir.glob("nodes/*/run-*/replica.json")]


def flower_processes(marker: str) -> list[str]:
    """The SuperLink and SuperNodes still alive of the deployment with ``marker``."""
    alive = []
    for pid in marked_processes(marker):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        alive += [command] if "flower-superlink" in command or "flower-supernode" in command else []
    return alive


def test_a_launcher_killed_mid_round_and_in_the_final_sync_resumes_to_the_in_process_run(client_dir, tmp_path):
    data, run_dir, log = client_dir, tmp_path / "run", tmp_path / "fedlora.log"
    markers = []
    # 1: killed while round 2's clients train (a node has taken round 2's task: its replica is through 1)
    kill_when(fedlora("run", *FLAGS, "--data", data, "--out", run_dir, log=log),
              lambda: rows_written(run_dir) == 2 and 1 in replica_rounds(run_dir), "round 2 started")
    markers.append((run_dir / "logs" / MARKER_FILE).read_text())
    deadline = time.monotonic() + 30
    while flower_processes(markers[-1]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not flower_processes(markers[-1]), "the SuperLink and SuperNodes outlived their launcher"
    # 2: resumed (round 2 from its start), killed once round 2 is in and the final sync has begun
    kill_when(fedlora("run", "--resume", run_dir, log=log),
              lambda: rows_written(run_dir) == 3 and not (run_dir / "flower-run.json").is_file(), "the final sync")
    markers.append((run_dir / "logs" / MARKER_FILE).read_text())
    # 3: resumed with every round done: the final sync alone
    assert fedlora("run", "--resume", run_dir, log=log).wait(timeout=600) == 0, log.read_text()
    markers.append((run_dir / "logs" / MARKER_FILE).read_text())

    expected = run_tiny(data, tmp_path / "inprocess", **SETTINGS)
    assert comparable(read_metrics(run_dir)) == comparable(expected)
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2
    server = restore_global_model(run_dir).global_model.adapted_weights()
    reference = restore_global_model(tmp_path / "inprocess").global_model.adapted_weights()
    for name, weight in server.items():
        assert (weight - reference[name]).abs().max() <= 1e-6, name
    for marker in markers:
        assert not marked_processes(marker)
    assert no_process_of(run_dir)
    assert_replicas_equal_the_server(run_dir)
    # every replica of the last launch was rebuilt from nothing: its final sync re-sent each node
    # every merge, and counted it (the ledger in metrics.jsonl counts rounds only, as in-process)
    merges = UpdateLog(run_dir / "base-log")
    history = BYTES_PER_PARAM * sum(factor_params(u.factors) + factor_params(u.residual)
                                    for u in map(merges.load, merges.rounds()))
    resumed = json.loads((run_dir / "flower-run.json").read_text())["flower"]
    assert resumed["transfers"] == {} and resumed["replica_round"] == {"0": 2, "1": 2, "2": 2}
    assert resumed["sync_transfer"]["catchup_bytes"] == 3 * history
