"""A run folder as read back: where it keeps what it wrote, its configuration, rows and summary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.engine.config import CONFIG_FILE, RunConfig, load_saved_config
from fedlora.engine.metrics import METRICS_FILE, SUMMARY_FILE, read_summary
from fedlora.engine.rows import RoundRow, read_rows


@dataclass(frozen=True)
class RunPaths:
    """Where a run folder keeps what it wrote."""

    run_dir: Path

    @property
    def config(self) -> Path:
        return self.run_dir / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.run_dir / METRICS_FILE

    @property
    def summary(self) -> Path:
        return self.run_dir / SUMMARY_FILE

    @property
    def report(self) -> Path:
        return self.run_dir / "report.md"

    @property
    def curves(self) -> Path:
        return self.run_dir / "curves.png"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


@dataclass(frozen=True)
class RunResult:
    """A run folder as read back: its configuration, every round's metrics and its summary
    (empty while the run has not finished)."""

    config: RunConfig
    rows: list[RoundRow]
    summary: dict
    paths: RunPaths

    @property
    def run_dir(self) -> Path:
        return self.paths.run_dir

    def metric(self, key: str) -> list[tuple[int, Any]]:
        """(round, value) of every round that measured ``key`` (a row field or a method's info)."""
        values = [(row.round, getattr(row, key, None) if key in RoundRow.__dataclass_fields__
                   else row.extra.get(key)) for row in self.rows]
        return [(r, value) for r, value in values if value is not None]


def load_run(run_dir: str | Path) -> RunResult:
    """A run folder as it is on disk (finished or not)."""
    run_dir = Path(run_dir)
    return RunResult(load_saved_config(run_dir / CONFIG_FILE), read_rows(run_dir), read_summary(run_dir),
                     RunPaths(run_dir))
