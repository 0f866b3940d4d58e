"""The benchmark scripts that train run end to end at tiny shapes, so that they keep up with the
engine's interfaces (the GPU check runs on a lent machine, where a broken part costs its time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two fresh processes train tiny models: half a minute
def test_the_gpu_checks_training_parts_run_at_tiny_shapes_on_this_machine(tmp_path):
    report = tmp_path / "gpu-dry-run.md"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    environment.pop("OUT", None)  # the device tool's folder, where the check would copy its report
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--parts",
                           "step,qlora", "--report", str(report)], capture_output=True, text=True, env=environment,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = report.read_text(encoding="utf-8")
    assert "## (5) QLoRA" in text and "| tiny (dry run) | nf4 |" in text
    assert "failed" not in text, text
