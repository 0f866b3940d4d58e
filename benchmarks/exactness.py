"""The exactness study's results, composed from its three sweeps (`make bench-exactness`).

Reads ``benchmarks/runs/{headline,drift,horizon}/comparison.json`` (written by ``fedlora
compare``) and writes into ``benchmarks/results/``:

- ``<sweep>/comparison.{md,json}`` and ``<sweep>.png``: each sweep's own comparison, copied;
- ``exactness.png``: Δ final test loss vs FLoRA and the mean aggregation error against local
  steps per round (the headline's homogeneous setting at 3, the drift sweep's levels), each
  with its 95 % interval;
- ``headline.md`` (README) and ``exactness.md`` (docs/benchmarks.md): what the intervals say, in
  sentences generated from the comparisons, then the figure and (docs) every table;
- ``src/fedlora/aggregation/measured_errors.json``: each method's measured aggregation error,
  which ``fedlora methods`` and the method pages show: the headline's, else the quality sweep's
  (``--measured-errors`` writes only this, as ``make bench-quality`` does).

Every sentence is made from the numbers: a difference is called significant only where its
paired 95 % interval excludes 0.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from fedlora.report import finish_round_axis, plot_mean_with_band
from fedlora.stats import paired_difference
from fedlora.sweep.compare import interval_text

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "runs"
RESULTS = ROOT / "benchmarks" / "results"
MEASURED = ROOT / "src" / "fedlora" / "aggregation" / "measured_errors.json"
SWEEPS = {"headline": "Headline: the two Dolly settings, 10 seeds", "drift": "Client drift: more local steps",
          "horizon": "Long horizon: 30 rounds"}
#: the headline's local steps per round (headline.toml), the x of its point in the figure
HEADLINE_STEPS = 3


def load(name: str) -> dict | None:
    path = RUNS / name / "comparison.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


#: a paired difference, its sign always shown
DELTA = "+.4f"

#: an aggregation error below this is float32 rounding, not inexactness
ROUNDING = 1e-6


def verdict(difference: dict | None) -> str:
    """Which side of 0 a paired difference of test losses lies on (lower loss is better)."""
    if not difference or difference.get("ci95") is None:
        return "without an interval (one seed)"
    low, high = difference["ci95"]
    return "significantly better than" if high < 0 else "significantly worse than" if low > 0 else \
        "not distinguishable from"


def error_text(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "—"
    if entry["ci95"] is not None and entry["ci95"][1] < ROUNDING:
        return f"< {ROUNDING:g} (exact up to float32 rounding)"
    return interval_text(entry, ".3g")


def setting_lines(name: str, variant: dict) -> list[str]:
    """One setting: the reference's loss, the methods grouped by what their Δ says, the errors."""
    reference, methods = variant["reference"], variant["methods"]
    pending = [f"{method} ({note})" for method, note in variant.get("pending", {}).items()]
    unfinished = f" Not finished: {', '.join(pending)}." if pending else ""
    if reference not in methods:
        return [f"  - {name}: the reference has not finished.{unfinished}"]
    others = {method: entry for method, entry in methods.items() if method != reference}
    by_verdict: dict[str, list[str]] = {}
    for method, entry in others.items():
        by_verdict.setdefault(verdict(entry["vs_reference"]), []).append(
            f"{method} Δ {interval_text(entry['vs_reference'], DELTA)}")
    said = [f"{text.capitalize()} {reference}: {', '.join(listed)}." for text, listed in by_verdict.items()]
    errors = [f"{method} {error_text(entry.get('aggregation_error'))}" for method, entry in methods.items()
              if method != "centralized"]
    return [f"  - {name}, {methods[reference]['seeds']} seeds: {reference}'s final test loss "
            f"{interval_text(methods[reference]['test_loss'], '.4f')}." + "".join(f" {sentence}" for sentence in said)
            + (f" Aggregation error: {', '.join(errors)}." if errors else "")
            + unfinished]


def horizon_sentences(comparison: dict) -> list[str]:
    """Per method: where its mean test loss was lowest, whether it rose from there to the last round
    (paired by seed), and the rounds where its gap to the reference was significant."""
    sentences = []
    for variant in comparison["settings"].values():
        for method, entry in variant["methods"].items():
            curve = [(r, i) for r, i in enumerate(entry["test_loss_per_round"]) if i is not None and r > 0]
            if not curve:
                continue
            (best_round, best), (last_round, last) = min(curve, key=lambda point: point[1]["mean"]), curve[-1]
            text = f"{method}: lowest mean test loss at round {best_round} ({interval_text(best, '.4f')})"
            if best_round == last_round:
                text += ", the last scored round"
            else:
                by_seed = entry["test_loss_per_round_by_seed"].values()
                rise = paired_difference([losses[last_round] for losses in by_seed],
                                         [losses[best_round] for losses in by_seed]).to_json()
                text += (f", round {last_round} {interval_text(last, '.4f')}: round {last_round} minus round "
                         f"{best_round}, paired by seed, {interval_text(rise, DELTA)} ({verdict_of_rise(rise)})")
            gaps = {}
            for r, gap in enumerate(entry.get("vs_reference_per_round") or []):
                if r > 0 and gap and gap.get("ci95") is not None and gap["significant"]:
                    gaps.setdefault("below" if gap["mean"] < 0 else "above", []).append(str(r))
            if entry.get("vs_reference_per_round"):
                reference = variant["reference"]
                text += "; " + ("; ".join(f"significantly {side} {reference}'s at round{'s' * (len(rs) > 1)} "
                                          f"{', '.join(rs)}" for side, rs in gaps.items())
                                or f"never significantly apart from {reference}'s")
            sentences.append(text)
    return sentences


def verdict_of_rise(rise: dict) -> str:
    """Whether the loss rose from its lowest round (picked after seeing the curve, which favours a rise)."""
    if rise.get("ci95") is None:
        return "one seed, no interval"
    low, high = rise["ci95"]
    return "a significant rise" if low > 0 else "a significant fall" if high < 0 else "no significant rise"


def is_exact(error: dict | None) -> bool:
    """Whether a measured aggregation error is float32 rounding in every seed (its interval below it)."""
    return bool(error) and error.get("ci95") is not None and error["ci95"][1] < ROUNDING


def levels(comparisons: dict[str, dict]) -> list[tuple[str, dict]]:
    """(what was compared, the comparison) for every setting of the study's sweeps, in the study's order."""
    found = []
    for name in SWEEPS:
        comparison = comparisons.get(name)
        if comparison is None:
            continue
        configuration = comparison["configuration"]
        rounds = "/".join(map(str, configuration["rounds"]))
        for setting, variant in comparison["settings"].items():
            base, _, swept = setting.partition(" · local_steps=")
            steps = swept or "/".join(map(str, configuration["local_steps"]))
            found.append((f"{base}, {steps} local steps × {rounds} rounds", variant))
    return found


def verdict_lines(comparisons: dict[str, dict]) -> list[str]:
    """The study's answer in a few lines: where an inexact method ended significantly worse than
    FLoRA (exactness paid), where no difference showed, and how exact rivals fared."""
    paid, unseen, inexact_better, exact_apart = [], [], [], []
    inexact_by_side = {"significantly worse than": paid, "significantly better than": inexact_better}
    for label, variant in levels(comparisons):
        for method, entry in variant["methods"].items():
            delta, error = entry.get("vs_reference"), entry.get("aggregation_error")
            if method in (variant["reference"], "centralized") or not delta or not error:
                continue
            said = f"{method}, {label}: Δ {interval_text(delta, DELTA)}"
            side = verdict(delta)
            if is_exact(error):
                if side.startswith("significantly"):
                    exact_apart.append(f"{said} ({side.split(' than')[0]})")
                continue
            said += f" (aggregation error {error['mean']:.3g})"
            inexact_by_side.get(side, unseen).append(said)
    lines = ["- **Exactness paid** (an inexact method's final test loss significantly above FLoRA's): "
             + ("; ".join(paid) or "nowhere") + ".",
             "- **It did not show** (the interval contains 0): " + ("; ".join(unseen) or "nowhere") + "."]
    if inexact_better:
        lines.append("- **An inexact method did significantly better**: " + "; ".join(inexact_better) + ".")
    points = figure_points(comparisons.get("headline"), comparisons.get("drift"))
    growth = [f"{method} " + ", ".join(f"{error_text(error)} at {steps}" for steps, _, error in series)
              for method, series in points.items() if not all(is_exact(error) for _, _, error in series)]
    if growth and comparisons.get("drift"):
        lines.append("- **Aggregation error against local steps per round** (homogeneous, mean over rounds): "
                     + "; ".join(growth) + ".")
    if exact_apart:
        lines.append("- **Exact methods differ too** (exact as well, they train differently): " + "; ".join(exact_apart)
                     + ".")
    if comparisons.get("horizon"):
        horizon = comparisons["horizon"]
        configuration = horizon["configuration"]
        scored = max((sum(1 for r, loss in enumerate(entry["test_loss_per_round"]) if r > 0 and loss)
                      for variant in horizon["settings"].values() for entry in variant["methods"].values()), default=0)
        lines.append(f"- **Long horizon** ({configuration['local_steps'][0]} local steps × "
                     f"{configuration['rounds'][0]} rounds; each of the {scored} scored rounds is tested on its own, "
                     "so one significant round among them can be chance; a last round is paired with the method's "
                     "lowest, picked after the fact, which favours finding a rise): "
                     + "; ".join(horizon_sentences(horizon)) + ".")
    return lines


def figure_points(headline: dict | None, drift: dict | None) -> dict[str, list[tuple[int, dict | None, dict | None]]]:
    """method → [(local steps, Δ vs FLoRA, aggregation error)] from the homogeneous settings."""
    levels: list[tuple[int, dict]] = []
    if headline and "homogeneous" in headline["settings"]:
        levels.append((HEADLINE_STEPS, headline["settings"]["homogeneous"]))
    for name, variant in (drift or {}).get("settings", {}).items():
        steps = int(name.rsplit("local_steps=", 1)[1]) if "local_steps=" in name else None
        if steps is not None:
            levels.append((steps, variant))
    points: dict[str, list] = {}
    for steps, variant in sorted(levels, key=lambda level: level[0]):
        for method, entry in variant["methods"].items():
            if method == "centralized":
                continue
            points.setdefault(method, []).append((steps, entry["vs_reference"], entry["aggregation_error"]))
    return points


def drift_sentences(points: dict[str, list[tuple[int, dict | None, dict | None]]]) -> list[str]:
    """Per method but the reference, its Δ vs FLoRA and its aggregation error at each number of
    local steps: how drift moves both."""
    sentences = []
    for method, series in points.items():
        if all(delta is None for _, delta, _ in series):  # the reference
            continue
        deltas = ", ".join(f"{interval_text(delta, DELTA)} at {steps}" for steps, delta, _ in series)
        errors = ", ".join(f"{error_text(error)} at {steps}" for steps, _, error in series)
        sentences.append(f"{method}: Δ {deltas}; aggregation error {errors}")
    return sentences


def plot(points: dict[str, list[tuple[int, dict | None, dict | None]]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    delta_ax, error_ax = fig.subplots(1, 2)
    for index, (method, series) in enumerate(points.items()):
        for ax, measured in ((delta_ax, [(steps, delta) for steps, delta, _ in series]),
                             (error_ax, [(steps, error) for steps, _, error in series])):
            measured = [(steps, entry) for steps, entry in measured if entry and entry.get("mean") is not None]
            if not measured:
                continue
            means = [entry["mean"] for _, entry in measured]
            bounds = [entry["ci95"] or [entry["mean"]] * 2 for _, entry in measured]
            nudge = 1 + 0.03 * (index - (len(points) - 1) / 2)  # methods side by side at each level (log axis)
            ax.errorbar([steps * nudge for steps, _ in measured], means, marker="o", capsize=3, color=f"C{index}",
                        label=method, yerr=[[m - low for m, (low, _) in zip(means, bounds)],
                                            [high - m for m, (_, high) in zip(means, bounds)]])
    delta_ax.axhline(0, color="grey", linewidth=0.8)
    delta_ax.set(title="final test loss − FLoRA's (paired by seed, 95 % CI)", ylabel="Δ test loss")
    error_ax.set(title="aggregation error, mean over rounds (95 % CI)", ylabel="‖Δ_global − Σ p_k Δ_k‖ / ‖Σ p_k Δ_k‖")
    ticks = sorted({steps for series in points.values() for steps, *_ in series})
    for ax in (delta_ax, error_ax):
        ax.set(xlabel="local steps per round", xscale="log")
        ax.minorticks_off()
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlim(min(ticks) / 1.3, max(ticks) * 1.3)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def plot_gaps(comparison: dict, path: Path) -> None:
    """Each method's test loss minus the reference's at every scored round (paired by seed, 95 % band)."""
    from matplotlib.figure import Figure

    settings = comparison["settings"]
    fig = Figure(figsize=(6.5 * len(settings), 4.2), layout="constrained")
    for ax, (name, variant) in zip(fig.subplots(1, len(settings), squeeze=False)[0], settings.items()):
        for index, (method, entry) in enumerate(variant["methods"].items()):
            gaps = [(r, gap) for r, gap in enumerate(entry.get("vs_reference_per_round") or []) if gap]
            if not gaps:
                continue
            plot_mean_with_band(ax, gaps, color=f"C{index}", label=method)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set(title=f"{name}: test loss − {variant['reference']}'s (paired by seed, 95 % CI)",
               ylabel="Δ test loss")
        finish_round_axis(ax, empty="no round scored")
    fig.savefig(path, dpi=120)


def measured_errors(comparisons: dict[str, dict]) -> dict[str, str]:
    """method → its aggregation error in each setting, as text: the headline's (10 seeds) where it
    measured the method, else the quality sweep's (3 seeds, every method), which the text names."""
    errors: dict[str, dict[str, str]] = {}
    for sweep in ("headline", "quality"):
        for name, variant in comparisons.get(sweep, {}).get("settings", {}).items():
            for method, entry in variant["methods"].items():
                if entry.get("aggregation_error") and method != "centralized" and name not in errors.get(method, {}):
                    source = "" if sweep == "headline" else ", quality sweep"
                    errors.setdefault(method, {})[name] = f"{error_text(entry['aggregation_error'])} ({name}{source})"
    return {method: "; ".join(texts.values()) for method, texts in errors.items()}


def write_measured_errors() -> None:
    """measured_errors.json from the headline and quality sweeps' comparisons (whichever have run)."""
    comparisons = {name: comparison for name in ("headline", "quality") if (comparison := load(name)) is not None}
    if comparisons:
        MEASURED.write_text(json.dumps({"errors": measured_errors(comparisons)}, indent=2) + "\n", encoding="utf-8")


def summary_lines(comparisons: dict[str, dict]) -> list[str]:
    lines = []
    titles = {"headline": "Headline (2 rounds × 3 local steps)", "drift": "Client drift (4 rounds)",
              "horizon": "Long horizon (30 rounds × 5 local steps)"}
    for name, title in titles.items():
        if name not in comparisons:
            lines.append(f"- **{title}**: not measured on this checkout yet (`benchmarks/{name}.toml`, part of "
                         "`make bench-exactness`).")
            continue
        lines.append(f"- **{title}**")
        for setting, variant in comparisons[name]["settings"].items():
            lines += setting_lines(setting, variant)
        if name == "drift":
            points = figure_points(comparisons.get("headline"), comparisons[name])
            lines.append("  - Against local steps per round (homogeneous; 3 is the headline): "
                         + "; ".join(drift_sentences(points)) + ".")
    measured = [comparison["measured"] for comparison in comparisons.values()]
    hours = sum(m["run_seconds"] for m in measured) / 3600
    lines.append(f"- Measured: {sum(m['runs'] for m in measured)} runs in {hours:.1f} h of this 2-core machine, each "
                 "run from its data loading to its summary, while development work shared the machine.")
    return lines


def main() -> None:
    if sys.argv[1:] == ["--measured-errors"]:  # after the quality sweep: only the errors `fedlora methods` shows
        write_measured_errors()
        return
    comparisons = {name: comparison for name in SWEEPS if (comparison := load(name)) is not None}
    if not comparisons:
        sys.exit("no exactness sweep has a comparison.json yet: run `make bench-exactness`")
    for name in comparisons:
        target = RESULTS / name
        target.mkdir(parents=True, exist_ok=True)
        for suffix in ("md", "json"):
            shutil.copyfile(RUNS / name / f"comparison.{suffix}", target / f"comparison.{suffix}")
        shutil.copyfile(RUNS / name / "comparison.png", RESULTS / f"{name}.png")  # beside the others, for the site
    points = figure_points(comparisons.get("headline"), comparisons.get("drift"))
    plot(points, RESULTS / "exactness.png")
    verdicts, details = verdict_lines(comparisons), summary_lines(comparisons)
    figures = ["![Δ vs FLoRA and aggregation error against local steps](exactness.png)"]
    if "horizon" in comparisons:
        plot_gaps(comparisons["horizon"], RESULTS / "horizon_gap.png")
        figures += ["", "![the long horizon: each method's test loss minus FLoRA's, round by round](horizon_gap.png)"]
    intro = ("When does exactness pay? FLoRA against FedIT, FFA-LoRA, flora-warm (and in the heterogeneous "
             "setting zero-padding and FlexLoRA) on SmolLM2-135M and the 9 Dolly clients, the learning rate tuned "
             "on validation per method; Δ is a method's final test loss minus FLoRA's, paired by seed, with its "
             "95 % interval (negative: better than FLoRA). Generated by `benchmarks/exactness.py` from the sweeps' "
             "comparison.json; every number below is in their tables.")
    link = "Each sweep in detail, every table: [benchmarks](docs/benchmarks.md#exactness)."
    (RESULTS / "headline.md").write_text("\n".join(["# Headline results", "", intro, "", *verdicts, "", *figures, "",
                                                    link]), encoding="utf-8")
    tables = []
    for name, title in SWEEPS.items():
        if name in comparisons:
            body = (RESULTS / name / "comparison.md").read_text(encoding="utf-8").split("\n", 1)[1].strip()
            tables += [f"## {title}", "", body.replace("\n## ", "\n### "), "",
                       f"![test loss per round]({name}.png)", ""]
    (RESULTS / "exactness.md").write_text("\n".join(["# Exactness", "", intro, "", *verdicts, "", "Each sweep:", "",
                                                     *details, "", *figures, "", *tables]), encoding="utf-8")
    write_measured_errors()
    print("\n".join(verdicts + [""] + details))


if __name__ == "__main__":
    main()
