"""Run outputs: metrics.jsonl → summary.json, report.md and curves.png.

A run folder holds ``metrics.jsonl`` (one JSON object per evaluation row, appended as the run
goes, so a crashed run keeps every finished round), ``summary.json`` (the final numbers,
replaced atomically) and, once :func:`write_report` runs, ``report.md`` and ``curves.png``.
:func:`compare_runs` draws several run folders side by side.

Row keys understood here (all optional except ``round``): ``round``, ``method``,
``eval_loss``, ``perplexity``, ``val_loss``, ``mmlu_acc``, ``mmlu_per_subject`` (``{subject: {"acc", "n"}}``),
``train_loss``, ``aggregation_error``, ``broadcast_error``, ``bytes_up``, ``bytes_down``, ``seconds``;
others are kept but not shown.
summary.json's scalars are listed as they are; its ``mmlu_per_subject``, when given, replaces
the latest row's, and its communication ledger summary
(``fedlora.engine.ledger.Ledger.summary``: ``bytes_up``, ``bytes_down``,
``up_vs_full_finetuning``, ``down_vs_full_finetuning``, at the top level or under
``communication``) replaces the totals summed from the rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.table import Table

from fedlora.engine.metrics import METRICS_FILE, MetricsError, read_summary
from fedlora.engine.rows import RoundRow, read_rows

REPORT_FILE = "report.md"
CURVES_FILE = "curves.png"
COMPARISON_FILE = "comparison.md"

MISSING = "—"


def format_bytes(n: float) -> str:
    """Human-readable size with binary prefixes: ``1536 → '1.50 KiB'``."""
    size, unit = float(n), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024:
            break
        size, unit = size / 1024, larger
    return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"


def _fixed(digits: int) -> Callable[[Any], str]:
    return lambda value: f"{value:.{digits}f}"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _significant(value: float) -> str:
    """Three significant digits: an exact method's 3e-08 beside an inexact one's 0.412."""
    return f"{value:.3g}"


#: row key (also the column header) → its formatter, for the per-round tables (markdown, console)
ROUND_COLUMNS: dict[str, Callable[[Any], str]] = {
    "round": str,
    "method": str,
    "eval_loss": _fixed(4),
    "perplexity": _fixed(2),
    "val_loss": _fixed(4),
    "mmlu_acc": _percent,
    "train_loss": _fixed(4),
    "aggregation_error": _significant,
    "broadcast_error": _significant,
    "bytes_up": format_bytes,
    "bytes_down": format_bytes,
    "seconds": _fixed(1),
}


def _cell(row: RoundRow, key: str, fmt: Callable[[Any], str]) -> str:
    value = getattr(row, key)
    return MISSING if value is None else fmt(value)


def _markdown_table(headers: list[str], body: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def rounds_markdown(rows: list[RoundRow]) -> list[str]:
    """The per-round metrics as markdown table lines."""
    return _markdown_table(list(ROUND_COLUMNS),
                           ([_cell(row, key, fmt) for key, fmt in ROUND_COLUMNS.items()]
                            for row in rows))


def console_table(rows: list[RoundRow], title: str | None = None) -> Table:
    """The per-round metrics as a rich table for the CLI: report.md's columns, but for those no
    row has a value in (a run without MMLU, a method without a global model to compare)."""
    table = Table(title=title)
    shown = {key: fmt for key, fmt in ROUND_COLUMNS.items()
             if key in ("round", "method") or any(getattr(row, key) is not None for row in rows)}
    for key in shown:
        # headers break at "_" (eval / loss): narrow terminals cut fewer columns
        table.add_column(key.replace("_", "\n"), justify="left" if key == "method" else "right")
    for row in rows:
        table.add_row(*(_cell(row, key, fmt) for key, fmt in shown.items()))
    return table


def _series(rows: list[RoundRow], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) for the rows where ``key`` was measured."""
    points = [(row.round, getattr(row, key)) for row in rows if getattr(row, key) is not None]
    return [r for r, _ in points], [v for _, v in points]


def _total(rows: list[RoundRow], key: str) -> int:
    return sum(getattr(row, key) or 0 for row in rows)


#: the last row's metrics shown in the final summary, beside summary.json's own scalars
FINAL_METRICS = ("eval_loss", "perplexity", "eval_tokens", "mmlu_acc", "mmlu_correct", "mmlu_total")


def _summary_section(rows: list[RoundRow], summary: dict) -> list[str]:
    """summary.json's scalars, the last round's metrics, MMLU per subject, communication."""
    last = rows[-1]
    entries = [(key, _scalar_text(value)) for key, value in summary.items()
               if not isinstance(value, (dict, list))]
    entries += [(f"final {key}", ROUND_COLUMNS.get(key, _scalar_text)(getattr(last, key)))
                for key in FINAL_METRICS if getattr(last, key) is not None]
    lines = ["## Final summary", ""]
    lines += _markdown_table(["metric", "value"], ([key, text] for key, text in entries))
    lines.append("")

    # summary.json's own breakdown, else the latest round that measured one (the round loop
    # keeps it in the rows; a run that stopped early has no summary at all)
    mmlu_row = next((row for row in reversed(rows) if row.mmlu_per_subject), None)
    per_subject = summary.get("mmlu_per_subject") or (mmlu_row.mmlu_per_subject if mmlu_row else None)
    if per_subject:
        when = f" (round {mmlu_row.round})" if "mmlu_per_subject" not in summary else ""
        lines += [f"### MMLU per subject{when}", ""]
        lines += _markdown_table(
            ["subject", "accuracy", "n"],
            ([subject, _percent(entry["acc"]), str(entry["n"])]
             for subject, entry in sorted(per_subject.items())))
        lines.append("")

    lines += _communication_lines(rows, summary)
    lines += _privacy_lines(summary)
    return lines


#: summary.json's per-client (ε, δ) tables (fedlora.engine.privacy) and their headers
PRIVACY_LEVELS = {"privacy": "sample-level (DP-SGD)", "client_privacy": "client-level (DP-FedAvg)"}


def _privacy_lines(summary: dict) -> list[str]:
    """Each client's spent (ε, δ) for each DP guarantee the run had; nothing without DP."""
    levels = {key: summary[key] for key in PRIVACY_LEVELS if summary.get(key)}
    if not levels:
        return []
    sigmas = summary.get("privacy_noise_multipliers", {})
    lines = ["### Differential privacy", ""]
    lines += [f"- {PRIVACY_LEVELS[key]}: noise multiplier {sigmas[key]:.4g}, "
              f"δ = {next(iter(spent.values()))['delta']:g}" for key, spent in levels.items() if key in sigmas]
    lines.append("")
    clients = list(next(iter(levels.values())))
    lines += _markdown_table(["client"] + [f"ε {PRIVACY_LEVELS[key]}" for key in levels],
                             ([cid] + [f"{levels[key][cid]['epsilon']:.4g}" for key in levels] for cid in clients))
    lines.append("")
    return lines


def _ledger(summary: dict) -> dict:
    """The communication ledger's summary: under ``communication`` or at the top level."""
    return summary.get("communication", summary)


def _byte_totals(rows: list[RoundRow], summary: dict) -> tuple[int, int]:
    """(bytes up, bytes down) over the run: the ledger's totals, else the rows' sums."""
    ledger = _ledger(summary)
    return (ledger.get("bytes_up", _total(rows, "bytes_up")),
            ledger.get("bytes_down", _total(rows, "bytes_down")))


def _communication_lines(rows: list[RoundRow], summary: dict) -> list[str]:
    """Byte totals and, when the ledger recorded them, the ratios to full fine-tuning."""
    up, down = _byte_totals(rows, summary)
    ledger = _ledger(summary)
    lines = ["### Communication", "",
             f"- total up: {format_bytes(up)} ({up} bytes)",
             f"- total down: {format_bytes(down)} ({down} bytes)"]
    for direction in ("up", "down"):
        ratio = ledger.get(f"{direction}_vs_full_finetuning")
        if ratio is not None:
            lines.append(f"- {direction} vs full fine-tuning: {ratio:.4%}")
    lines.append("")
    return lines


def _scalar_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return MISSING if value is None else str(value)


# --- plots ---------------------------------------------------------------------------------


def finish_round_axis(ax, *, empty: str) -> None:
    """A panel of curves against round: integer rounds, a grid, and a legend, or ``empty``
    written across it when nothing was plotted."""
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)


def _plot_curves(path: Path, runs: dict[str, list[RoundRow]]) -> None:
    """eval_loss and mmlu_acc against round, one line per run, into a two-panel PNG.

    Uses the object-oriented ``Figure`` API, which renders with Agg without touching pyplot's
    global state, so it is safe in headless and multi-threaded callers.
    """
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    loss_ax, mmlu_ax = fig.subplots(1, 2)
    for index, (label, rows) in enumerate(runs.items()):
        color = f"C{index}"  # one colour per run in both panels, measured in both or not
        for ax, key in ((loss_ax, "eval_loss"), (mmlu_ax, "mmlu_acc")):
            rounds, values = _series(rows, key)
            if rounds:
                ax.plot(rounds, values, marker="o", markersize=3, color=color, label=label)
    for ax, title in ((loss_ax, "held-out loss"), (mmlu_ax, "MMLU accuracy")):
        ax.set_title(title)
        finish_round_axis(ax, empty="not measured")
    loss_ax.set_ylabel("eval_loss")
    mmlu_ax.set_ylabel("mmlu_acc")
    fig.savefig(path, dpi=120)


def _run_method(rows: list[RoundRow]) -> str | None:
    return next((row.method for row in reversed(rows) if row.method), None)


def _run_label(folder: str, rows: list[RoundRow]) -> str:
    """Legend text: the run folder, plus its method when the folder name does not say it."""
    method = _run_method(rows)
    return f"{folder} ({method})" if method and method != folder else folder


# --- public entry points -------------------------------------------------------------------


def write_report(out_dir: str | Path) -> list[Path]:
    """Write ``report.md`` and ``curves.png`` for one run folder; returns the paths written."""
    out_dir = Path(out_dir)
    rows = read_rows(out_dir)
    if not rows:
        raise MetricsError(f"{out_dir / METRICS_FILE}: no metrics to report")
    summary = read_summary(out_dir)

    lines = [f"# Run report: {out_dir.name}", "", "## Rounds", ""]
    lines += rounds_markdown(rows)
    lines.append("")
    lines += _summary_section(rows, summary)
    lines += [f"![curves]({CURVES_FILE})", ""]

    report_path, curves_path = out_dir / REPORT_FILE, out_dir / CURVES_FILE
    report_path.write_text("\n".join(lines), encoding="utf-8")
    _plot_curves(curves_path, {_run_label(out_dir.name, rows): rows})
    return [report_path, curves_path]


def compare_runs(parent_dir: str | Path) -> list[Path]:
    """Compare every subfolder of ``parent_dir`` holding a metrics.jsonl (one run each).

    Writes ``comparison.md`` (final and best eval loss, final MMLU, total bytes per run) and
    one ``curves.png`` with every run drawn together; returns the paths written.
    """
    parent_dir = Path(parent_dir)
    if not parent_dir.is_dir():
        raise MetricsError(f"{parent_dir}: not a directory")
    runs = {folder.name: read_rows(folder)
            for folder in sorted(parent_dir.iterdir())
            if (folder / METRICS_FILE).is_file()}
    runs = {name: rows for name, rows in runs.items() if rows}
    if not runs:
        raise MetricsError(f"{parent_dir}: no subfolder holds a non-empty {METRICS_FILE}")

    body = []
    for name, rows in runs.items():
        summary = read_summary(parent_dir / name)
        _, losses = _series(rows, "eval_loss")
        _, accs = _series(rows, "mmlu_acc")
        up, down = _byte_totals(rows, summary)
        body.append([
            name,
            _run_method(rows) or MISSING,
            str(max(row.round for row in rows)),
            f"{losses[-1]:.4f}" if losses else MISSING,
            f"{min(losses):.4f}" if losses else MISSING,
            _percent(accs[-1]) if accs else MISSING,
            format_bytes(up),
            format_bytes(down),
        ])
    lines = [f"# Run comparison: {parent_dir.name}", ""]
    lines += _markdown_table(["run", "method", "rounds", "final eval_loss", "best eval_loss",
                              "final mmlu_acc", "total up", "total down"], body)
    lines += ["", f"![curves]({CURVES_FILE})", ""]

    comparison_path, curves_path = parent_dir / COMPARISON_FILE, parent_dir / CURVES_FILE
    comparison_path.write_text("\n".join(lines), encoding="utf-8")
    _plot_curves(curves_path, {_run_label(name, rows): rows for name, rows in runs.items()})
    return [comparison_path, curves_path]
