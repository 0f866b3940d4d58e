"""kill -9 at chosen moments of a real `fedlora run` process, then `--resume` to the same end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support import comparable, write_clients

RUN = ["run", "--model", "tiny-llama", "--rounds", "3", "--local-steps", "2", "--batch-size", "2",
       "--max-length", "32", "--ranks", "4,2,1", "--clients-per-round", "2", "--lr", "0.01"]

# Each snippet patches one function so that the process SIGKILLs itself at that moment of round 2.
KILL_POINTS = {
    "during round-2 training": """
import fedlora.engine.client as target
original = target.LocalTrainer.train
def patched(self, task, examples, on_step=None):
    if task.server_round == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, task, examples, on_step)
target.LocalTrainer.train = patched
""",
    "half-way through writing the round-2 tensors": """
import fedlora.engine.checkpoint as target
original = target.save_file
def patched(tensors, path):
    if "round-0002" in str(path):
        items = list(tensors.items())
        original(dict(items[: len(items) // 2]), path)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(tensors, path)
target.save_file = patched
""",
    "after the round-2 folder is renamed, before LATEST names it": """
import fedlora.engine.checkpoint as target
original = target.atomic_write_text
def patched(path, text):
    if text == "round-0002":
        os.kill(os.getpid(), signal.SIGKILL)
    return original(path, text)
target.atomic_write_text = patched
""",
    "before the first checkpoint (round-0 evaluation)": """
import fedlora.engine.federation as target
original = target.Federation.evaluate
def patched(self, server_round):
    if server_round == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, server_round)
target.Federation.evaluate = patched
""",
}


def fedlora(args: list[str], patch: str = "") -> subprocess.CompletedProcess:
    script = f"import os, signal\n{patch}\nfrom fedlora.cli import app\napp()\n"
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = write_clients(tmp_path_factory.mktemp("clients"))
    out = tmp_path_factory.mktemp("full") / "run"
    done = fedlora(RUN + ["--data", folder, "--out", out])
    assert done.returncode == 0, done.stderr
    return folder, metrics(out)


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(KILL_POINTS))
def test_sigkill_then_resume_reaches_the_uninterrupted_metrics(uninterrupted, tmp_path, moment):
    data, expected = uninterrupted
    out = tmp_path / "run"
    killed = fedlora(RUN + ["--data", data, "--out", out], patch=KILL_POINTS[moment])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = fedlora(["run", "--resume", out])
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(metrics(out)) == comparable(expected)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["LATEST", "round-0003"]
