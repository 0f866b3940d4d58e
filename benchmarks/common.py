"""Helpers shared by the benchmarks: shared data, subprocess measurements, spreads, Markdown, runs.

Run the benchmarks from the repository root: the data paths below are relative to it, as
in fedlora's own defaults.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Container, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

SHARED_DATA = Path("../shared/data")
DOLLY = SHARED_DATA / "dolly-10clients"
DOLLY_TEST = DOLLY / "global_test.json"
MMLU = SHARED_DATA / "mmlu" / "mmlu_test_1444.json"
DEMO_CONFIG = Path("configs/demo.toml")
RESULTS = Path(__file__).parent / "results"


def require_shared_data() -> None:
    """Stop with one clear line when the shared Dolly clients or MMLU questions are absent."""
    missing = [path for path in (DOLLY_TEST, MMLU) if not path.is_file()]
    if missing:
        sys.exit(f"benchmark data not found: {', '.join(map(str, missing))} (relative to "
                 f"{Path.cwd()}); run from the repository root with ../shared/data present")


def dolly_client_files() -> list[Path]:
    return sorted(DOLLY.glob("local_training_*.json"))


def pool_dolly(destination: Path) -> Path:
    """All Dolly client records in one JSON list, written to ``destination``."""
    pooled = [record for file in dolly_client_files() for record in json.loads(file.read_text())]
    destination.write_text(json.dumps(pooled))
    return destination


# --- measurement ------------------------------------------------------------------------------


#: the libraries whose import dominates a fresh process's start-up
HEAVY_MODULES = ("torch", "transformers", "peft", "flwr")
#: appended to a probe's Python source: it then names, on standard error, which of them it imported
HEAVY_REPORT = f"\nimport sys\nprint('HEAVY', *[m for m in {HEAVY_MODULES!r} if m in sys.modules], file=sys.stderr)\n"


def heavy_imports(stderr: str) -> list[str]:
    """Which of HEAVY_MODULES a probe ending in HEAVY_REPORT imported, from its standard error."""
    return next(line for line in stderr.splitlines() if line.startswith("HEAVY")).split()[1:]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``, ``RssFile``, …) in MB; nan where there is none."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


def file_rss_mb() -> float:
    """The part of this process's RSS that is file pages (mapped files: libraries, safetensors):
    clean pages the kernel can drop under pressure, unlike the anonymous rest."""
    return _status_mb("RssFile")


def measure_in_subprocess(script: str, args: Sequence[str], env: dict[str, str] | None = None) -> dict:
    """Run ``script`` with ``args`` in a fresh interpreter (``env`` added to the environment);
    its last stdout line is a JSON result.

    A fresh process per measurement makes its peak RSS its own.
    """
    completed = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                               env={**os.environ, **(env or {})})
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"measurement {' '.join(args)} failed (exit {completed.returncode})")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def timed(function) -> dict:
    """CPU and wall seconds of one call, and what it returned."""
    cpu, wall = time.process_time(), time.perf_counter()
    value = function()
    return {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall, "value": value}


def timed_mmlu_scoring(model_name: str, batch_size: int, prompt_format: str = "alpaca") -> tuple:
    """``model_name`` loaded with packing where it computes it, every MMLU question, and fedlora's
    scoring of them in ``prompt_format`` timed after a warm-up batch: (model, tokenizer, questions,
    packing, timed)."""
    from fedlora.attention import enable_packing
    from fedlora.data import load_mmlu
    from fedlora.eval.mmlu import answer_log_likelihoods
    from fedlora.models import load_model

    model, tokenizer = load_model(model_name)
    questions = load_mmlu(MMLU)
    packing = enable_packing(model)
    def score(selected):
        return answer_log_likelihoods(model, tokenizer, selected, prompt_format=prompt_format, batch_size=batch_size,
                                      packed=packing)
    score(questions[:batch_size])
    scored = timed(lambda: score(questions))
    return model, tokenizer, questions, packing, scored


def run_cli(arguments: Sequence[str]) -> float:
    """Wall seconds of ``fedlora <arguments>`` as a user runs it (this venv's console script)."""
    command = [str(Path(sys.executable).parent / "fedlora"), *arguments]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout + completed.stderr)
        raise SystemExit(f"{' '.join(command)} failed (exit {completed.returncode})")
    return seconds


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def spread_text(values: Sequence[float], digits: int = 3) -> str:
    return " / ".join(f"{value:.{digits}f}" for value in spread(values))


# --- reporting --------------------------------------------------------------------------------


def environment_line(threads: int, load_at_start: float) -> str:
    """Date, machine, versions, and how busy the machine was when the benchmark started."""
    import peft

    thread_note = f" ({threads} intra-op thread{'s' if threads != 1 else ''})"
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · {os.cpu_count()} cores "
            f"({platform.processor() or platform.machine()}), torch {torch.__version__}{thread_note}, "
            f"peft {peft.__version__}; 1-minute load average {load_at_start:.2f} at the start")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]],
                   align: str | None = None) -> list[str]:
    """``align``: one character per column, ``l`` or ``r`` (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    return [f"| {' | '.join(headers)} |", f"|{'|'.join(rule)}|",
            *(f"| {' | '.join(str(cell) for cell in row)} |" for row in rows)]


def write_result(name: str, text: str) -> Path:
    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- federated runs ---------------------------------------------------------------------------


def prepare(values: dict, run_dir: Path, loaded: tuple | None = None, **runtime):
    """A fedlora RunSetup of the config ``values``; its log goes to stderr, indented; ``runtime``:
    what :func:`fedlora.engine.setup.prepare_run` takes besides."""
    from fedlora.engine.config import build_config
    from fedlora.engine.setup import prepare_run

    return prepare_run(build_config(values, source="benchmark"), run_dir,
                       log=lambda message: print(f"  {message}", file=sys.stderr), loaded=loaded, **runtime)


def run_federation(values: dict, run_dir: Path, loaded: tuple | None = None,
                   evaluated_rounds: Container[int] | None = None) -> tuple[list[dict], dict]:
    """One in-process run of the config ``values`` (through fedlora.api, as every run goes);
    returns (metrics rows, summary).

    With ``loaded`` = (model, tokenizer) the model is shared across runs: the base weights
    merges change are restored afterwards, so the next run starts from the same model.
    ``evaluated_rounds``: evaluate only these rounds (default every round), for a benchmark
    that reports no other round's loss.
    """
    from fedlora.api import execute
    from fedlora.engine.config import build_config, save_config
    from fedlora.engine.global_model import GlobalModel
    from fedlora.engine.inputs import check_model_fits
    from fedlora.runtime.observer import RunObserver

    class StderrLog(RunObserver):
        def log(self, message: str) -> None:
            print(f"  {message}", file=sys.stderr)

    def evaluation(evaluator, global_model):
        if evaluated_rounds is None:
            return evaluator
        return lambda model, server_round: evaluator(model, server_round) if server_round in evaluated_rounds else {}

    config = build_config({**values, "out": str(run_dir)}, source="benchmark")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    save_config(config, Path(run_dir) / "config.json")
    shared = GlobalModel(loaded[0], check_model_fits(config)) if loaded is not None else None
    pristine = shared.adapted_weights() if shared is not None else None
    try:
        result = execute(config, Path(run_dir), [StderrLog()], loaded=loaded, evaluation=evaluation)
    finally:
        if shared is not None:
            shared.load_adapted_weights(pristine)
    return [row.to_json() for row in result.rows], result.summary
