"""Run outputs: metrics.jsonl → summary.json, report.md and curves.png.

A run folder holds ``metrics.jsonl`` (one JSON object per evaluation row, appended as the run
goes, so a crashed run keeps every finished round), ``summary.json`` (the final numbers,
replaced atomically) and, once :func:`write_report` runs, ``report.md`` and ``curves.png``.
:func:`compare_runs` draws several run folders side by side.

The rows are :class:`~fedlora.engine.rows.RoundRow`; a table shows each column some row has
a value in, accuracies with their n and 95 % Wilson interval, lm-eval's tasks a column per
metric. Keys that are not a RoundRow field are kept but not shown.
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
from fedlora.stats import accuracy_text, wilson_interval

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


#: what a column shows of a row; None: not measured that round
Cell = Callable[[RoundRow], str | None]


def _shown(key: str, fmt: Callable[[Any], str]) -> Cell:
    return lambda row: None if (value := getattr(row, key)) is None else fmt(value)


def _accuracy(key: str, n_key: str) -> Cell:
    return lambda row: None if (value := getattr(row, key)) is None else accuracy_text(value, getattr(row, n_key))


#: column header (a row key) → what it shows, for the per-round tables (markdown, console)
ROUND_COLUMNS: dict[str, Cell] = {
    "round": _shown("round", str),
    "method": _shown("method", str),
    "eval_loss": _shown("eval_loss", _fixed(4)),
    "perplexity": _shown("perplexity", _fixed(2)),
    "val_loss": _shown("val_loss", _fixed(4)),
    "rouge_l": _shown("rouge_l", _fixed(4)),
    "exact_match": _accuracy("exact_match", "generation_n"),
    "mmlu_acc": _accuracy("mmlu_acc", "mmlu_total"),
    "train_loss": _shown("train_loss", _fixed(4)),
    "aggregation_error": _shown("aggregation_error", _significant),
    "broadcast_error": _shown("broadcast_error", _significant),
    "bytes_up": _shown("bytes_up", format_bytes),
    "bytes_down": _shown("bytes_down", format_bytes),
    "eval_seconds": _shown("eval_seconds", _fixed(1)),
    "seconds": _shown("seconds", _fixed(1)),
}

#: lm-eval metrics that are a share of documents right: shown with a Wilson interval
TASK_ACCURACIES = ("acc", "acc_norm", "exact_match")


def task_metric_text(scores: dict, metric: str) -> str:
    """An lm-eval metric of one task with its n: an accuracy with its Wilson interval, another
    metric ± 1.96 standard errors where lm-eval gives one."""
    value, n = scores[metric], scores.get("n")
    if metric in TASK_ACCURACIES:
        return accuracy_text(value, n)
    stderr = scores.get(f"{metric}_stderr")
    spread = f" ± {1.96 * stderr:.4f}" if isinstance(stderr, float) and math.isfinite(stderr) else ""
    return f"{value:.4f}{spread}" + (f" n={n}" if n else "")


def _task_columns(rows: list[RoundRow]) -> dict[str, Cell]:
    """A column per (lm-eval task, metric) any row measured, ``task/metric``."""
    names = dict.fromkeys((task, metric) for row in rows for task, scores in (row.tasks or {}).items()
                          for metric in scores if metric != "n" and not metric.endswith("_stderr"))

    def cell(task: str, metric: str) -> Cell:
        return lambda row: (None if metric not in (row.tasks or {}).get(task, {})
                            else task_metric_text(row.tasks[task], metric))
    return {f"{task}/{metric}": cell(task, metric) for task, metric in names}


def _columns(rows: list[RoundRow]) -> dict[str, Cell]:
    """Every column, lm-eval's tasks before the training and communication ones."""
    position = list(ROUND_COLUMNS).index("train_loss")
    items = list(ROUND_COLUMNS.items())
    return dict(items[:position] + list(_task_columns(rows).items()) + items[position:])


def _markdown_table(headers: list[str], body: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def rounds_markdown(rows: list[RoundRow]) -> list[str]:
    """The per-round metrics as markdown table lines: the columns some row has a value in."""
    shown = _measured_columns(rows)
    return _markdown_table(list(shown), ([cell(row) or MISSING for cell in shown.values()] for row in rows))


def _measured_columns(rows: list[RoundRow]) -> dict[str, Cell]:
    return {key: cell for key, cell in _columns(rows).items()
            if key in ("round", "method") or any(cell(row) is not None for row in rows)}


def console_table(rows: list[RoundRow], title: str | None = None) -> Table:
    """The per-round metrics as a rich table for the CLI: report.md's columns, those some row
    has a value in (a run without MMLU, a method without a global model to compare)."""
    table = Table(title=title)
    shown = _measured_columns(rows)
    for key in shown:
        # headers break at "_" (eval / loss): narrow terminals cut fewer columns
        table.add_column(key.replace("_", "\n"), justify="left" if key == "method" else "right")
    for row in rows:
        table.add_row(*(cell(row) or MISSING for cell in shown.values()))
    return table


def generation_lines(rows: list[RoundRow], *, width: int | None = None) -> list[str]:
    """The first held-out prompt the rows' generation answered, its reference, and the answers
    of the first and the latest round that generated (before and after training), each cut to
    ``width`` characters if given."""
    generated = [row for row in rows if row.sample_generation]
    if not generated:
        return []

    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if width is None or len(text) <= width else text[:width - 1] + "…"
    sample = generated[0].sample_generation
    lines = [f"prompt: {cut(sample['prompt'])}", f"reference: {cut(sample['reference'])}"]
    answered = generated[:1] + generated[1:][-1:]
    return lines + [f"answer, round {row.round}: {cut(row.sample_generation['answer'])}" for row in answered]


def _series(rows: list[RoundRow], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) for the rows where ``key`` was measured."""
    points = [(row.round, getattr(row, key)) for row in rows if getattr(row, key) is not None]
    return [r for r, _ in points], [v for _, v in points]


def _total(rows: list[RoundRow], key: str) -> int:
    return sum(getattr(row, key) or 0 for row in rows)


#: the last row's measurements shown in the final summary, beside summary.json's own scalars
FINAL_METRICS = ("eval_loss", "perplexity", "val_loss", "rouge_l", "exact_match", "mmlu_acc")


def _summary_section(rows: list[RoundRow], summary: dict) -> list[str]:
    """summary.json's scalars, the last round's measurements, the generated answers, MMLU per
    subject, communication."""
    last = rows[-1]
    columns = _columns(rows)
    entries = [(key, _scalar_text(value)) for key, value in summary.items()
               if not isinstance(value, (dict, list))]
    finals = [*FINAL_METRICS, *_task_columns(rows)]
    entries += [(f"final {key}", text) for key in finals if (text := columns[key](last)) is not None]
    if last.eval_tokens is not None:
        entries.append(("final eval_tokens", str(last.eval_tokens)))
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

    answered = generation_lines(rows)
    if answered:
        lines += ["### A held-out prompt answered", ""] + [f"- {line}" for line in answered] + [""]

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


def plot_mean_with_band(ax, points: list[tuple[int, dict]], *, color: str, label: str) -> None:
    """A curve of ``{"mean", "ci95"}`` entries against round, its 95 % interval shaded where it has one."""
    rounds = [r for r, _ in points]
    ax.plot(rounds, [entry["mean"] for _, entry in points], marker="o", markersize=3, color=color, label=label)
    banded = [(r, entry["ci95"]) for r, entry in points if entry["ci95"] is not None]
    if banded:
        ax.fill_between([r for r, _ in banded], [low for _, (low, _) in banded], [high for _, (_, high) in banded],
                        color=color, alpha=0.15, linewidth=0)


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


def _accuracy_points(rows: list[RoundRow]) -> dict[str, list[tuple[int, float, float, float]]]:
    """Every accuracy the rows measured: (round, accuracy, Wilson low, high) by name."""
    series: dict[str, list[tuple[int, float, float, float]]] = {}

    def add(name: str, row: RoundRow, accuracy: float, n: int | float | None) -> None:
        if n and not math.isnan(accuracy):
            series.setdefault(name, []).append((row.round, accuracy, *wilson_interval(accuracy * n, round(n))[1:]))

    for row in rows:
        if row.mmlu_acc is not None:
            add("MMLU", row, row.mmlu_acc, row.mmlu_total)
        for task, scores in (row.tasks or {}).items():
            for metric in TASK_ACCURACIES:
                if metric in scores:
                    add(f"{task}/{metric}", row, scores[metric], scores.get("n"))
    return series


def _plot_curves(path: Path, runs: dict[str, list[RoundRow]]) -> None:
    """Held-out loss, and where measured ROUGE-L and accuracies (with their 95 % Wilson
    intervals), against round, one colour per run, into one PNG. Every panel spans every
    round of the runs on an integer axis, so a value measured once is a marker at its round.

    Uses the object-oriented ``Figure`` API, which renders with Agg without touching pyplot's
    global state, so it is safe in headless and multi-threaded callers.
    """
    every_row = [row for rows in runs.values() for row in rows]
    panels = ["loss"] + [name for name, measured in (("rouge_l", any(r.rouge_l is not None for r in every_row)),
                                                     ("accuracy", bool(_accuracy_points(every_row)))) if measured]
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    axes = dict(zip(panels, fig.subplots(1, len(panels), squeeze=False)[0]))
    for index, (label, rows) in enumerate(runs.items()):
        color = f"C{index}"  # one colour per run in every panel
        for key, style, suffix in (("eval_loss", "-", ""), ("val_loss", "--", " (validation)")):
            rounds, values = _series(rows, key)
            if rounds:
                axes["loss"].plot(rounds, values, style, marker="o", markersize=3, color=color, label=label + suffix)
        if "rouge_l" in axes and (series := _series(rows, "rouge_l"))[0]:
            axes["rouge_l"].plot(*series, marker="o", markersize=4, color=color, label=label)
        for marker, (name, points) in zip("osD^v", _accuracy_points(rows).items()):
            rounds, accuracies, lows, highs = zip(*points)
            errors = [[a - low for a, low in zip(accuracies, lows)], [high - a for a, high in zip(accuracies, highs)]]
            axes["accuracy"].errorbar(rounds, accuracies, yerr=errors, marker=marker, markersize=4, capsize=3,
                                      color=color, label=f"{label}: {name}")
    titles = {"loss": ("held-out loss", "loss"), "rouge_l": ("generation: ROUGE-L F", "rouge_l"),
              "accuracy": ("accuracy (95 % Wilson interval)", "accuracy")}
    last_round = max((row.round for row in every_row), default=0)
    for name, ax in axes.items():
        ax.set(title=titles[name][0], ylabel=titles[name][1], xlim=(-0.5, last_round + 0.5))
        finish_round_axis(ax, empty="not measured")
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

    Writes ``comparison.md`` (final and best eval loss, final ROUGE-L and MMLU, total bytes per run) and
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
        _, rouges = _series(rows, "rouge_l")
        mmlu_row = next((row for row in reversed(rows) if row.mmlu_acc is not None), None)
        up, down = _byte_totals(rows, summary)
        body.append([
            name,
            _run_method(rows) or MISSING,
            str(max(row.round for row in rows)),
            f"{losses[-1]:.4f}" if losses else MISSING,
            f"{min(losses):.4f}" if losses else MISSING,
            f"{rouges[-1]:.4f}" if rouges else MISSING,
            ROUND_COLUMNS["mmlu_acc"](mmlu_row) if mmlu_row else MISSING,
            format_bytes(up),
            format_bytes(down),
        ])
    lines = [f"# Run comparison: {parent_dir.name}", ""]
    lines += _markdown_table(["run", "method", "rounds", "final eval_loss", "best eval_loss", "final rouge_l",
                              "final mmlu_acc", "total up", "total down"], body)
    lines += ["", f"![curves]({CURVES_FILE})", ""]

    comparison_path, curves_path = parent_dir / COMPARISON_FILE, parent_dir / CURVES_FILE
    comparison_path.write_text("\n".join(lines), encoding="utf-8")
    _plot_curves(curves_path, {_run_label(name, rows): rows for name, rows in runs.items()})
    return [comparison_path, curves_path]
