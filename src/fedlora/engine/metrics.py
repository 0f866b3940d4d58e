"""A run folder's metrics: ``metrics.jsonl`` (one JSON object per evaluated round, appended as
the run goes, so a crashed run keeps every finished round) and ``summary.json`` (the final
numbers, replaced atomically). Presentation of them is in :mod:`fedlora.report`."""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.errors import FedloraError
from fedlora.files import append_text, atomic_write_text

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class MetricsError(FedloraError):
    """A metrics or summary file that cannot be read; names the file and line."""


def _metrics_line(row: dict) -> str:
    return json.dumps(row, separators=(",", ":")) + "\n"


def append_metrics(out_dir: str | Path, row: dict) -> None:
    """Append ``row`` as one JSON line to ``out_dir/metrics.jsonl``, durably (flush + fsync)."""
    append_text(Path(out_dir) / METRICS_FILE, _metrics_line(row))


def rewrite_metrics(out_dir: str | Path, rows: list[dict]) -> None:
    """Replace ``metrics.jsonl`` by ``rows`` atomically.

    A resumed run calls this to drop rows written after its checkpoint, which it will redo.
    """
    atomic_write_text(Path(out_dir) / METRICS_FILE, "".join(_metrics_line(row) for row in rows))


def read_metrics(out_dir: str | Path) -> list[dict]:
    """All rows of ``out_dir/metrics.jsonl`` in order; ``[]`` when the file does not exist.

    A last line without its newline is the trace of a run killed mid-write and is skipped;
    any other unparsable line raises :class:`MetricsError` naming the file and line.
    """
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            interrupted_write = number == len(lines) and not text.endswith("\n")
            if interrupted_write:
                continue
            raise MetricsError(f"{path}: line {number} is not valid JSON ({err.msg})") from err
    return rows


def write_summary(out_dir: str | Path, summary: dict) -> Path:
    """Write ``out_dir/summary.json`` atomically (temporary file, fsync, ``os.replace``)."""
    path = Path(out_dir) / SUMMARY_FILE
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    return path


def read_summary(out_dir: str | Path) -> dict:
    """``out_dir/summary.json``, or ``{}`` when the run has not finished."""
    path = Path(out_dir) / SUMMARY_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MetricsError(f"{path}: not valid JSON ({err.msg})") from err
