"""`fedlora compare DIR`: a sweep's methods side by side, with intervals, in comparison.json,
comparison.md and comparison.png.

Per (setting, method): the tuned values chosen on validation loss, then on the test set at
that choice only the final and best test loss (mean over seeds, 95 % t-interval), ROUGE-L of
the final model's generated answers where the runs generated (likewise, with its paired
difference to the reference), MMLU
(Wilson interval over the questions of every seed's run), communication per round as a
fraction of full fine-tuning, and the paired difference of the final test loss to a reference
method over the seeds both ran (same seed: same data split, client sampling and initial
draws), with its 95 % t-interval; a difference is significant when that interval excludes 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fedlora.engine.config import ConfigError
from fedlora.files import atomic_write_text
from fedlora.report import finish_round_axis, plot_mean_with_band
from fedlora.sweep.outcomes import RunOutcome, is_finished
from fedlora.sweep.plan import SEED, TuningRule, point_name
from fedlora.sweep.runner import PLAN_FILE
from fedlora.stats import CONFIDENCE, mean_interval, paired_difference, wilson_interval
from fedlora.sweep.tuning import Choice, choose, groups

JSON_FILE = "comparison.json"
MARKDOWN_FILE = "comparison.md"
PLOT_FILE = "comparison.png"


@dataclass(frozen=True)
class RecordedRun:
    """A run as the sweep folder's plan file lists it."""

    folder: str
    setting: str
    method: str
    point: dict[str, Any]


def write_comparison(sweep_dir: str | Path, reference: str | None = None) -> list[Path]:
    """Write comparison.json, comparison.md and comparison.png into ``sweep_dir``; returns their paths."""
    sweep_dir = Path(sweep_dir)
    comparison = build_comparison(sweep_dir, reference)
    paths = [sweep_dir / JSON_FILE, sweep_dir / MARKDOWN_FILE, sweep_dir / PLOT_FILE]
    atomic_write_text(paths[0], json.dumps(_finite(comparison), indent=2) + "\n")
    atomic_write_text(paths[1], comparison_markdown(comparison))
    plot_comparison(comparison, paths[2])
    return paths


#: what the runs were trained and evaluated with, stated above the tables (the values of every finished run)
SHARED_KEYS = ("model", "prompt_format", "max_length", "batch_size", "rounds", "local_steps", "clients_per_round")


def build_comparison(sweep_dir: Path, reference: str | None = None) -> dict:
    """The comparison of every (setting, method) whose runs have all finished."""
    plan_file = Path(sweep_dir) / PLAN_FILE
    if not plan_file.is_file():
        raise ConfigError(f"{sweep_dir}: no {PLAN_FILE}; is this the --out folder of a `fedlora sweep`?")
    plan = json.loads(plan_file.read_text(encoding="utf-8"))
    runs = [RecordedRun(**entry) for entry in plan["runs"]]
    reference = reference or plan["reference"]
    tune, grid = plan["tune"], plan["grid"]
    seeds = plan.get("tune_seeds")
    rule = TuningRule(tuple(tune), grid, plan.get("method_grids", {}), tuple(seeds) if seeds is not None else None)
    final = plan["final"]
    question_set = None if final is None else {key: final[key] for key in ("mmlu", "questions", "sample_seed")}
    outcomes = {run.folder: RunOutcome.read(sweep_dir / run.folder) for run in runs
                if is_finished(sweep_dir / run.folder)}
    settings: dict[str, dict] = {}
    planned = 0
    for group, group_runs in groups(runs, tune).items():
        variant = settings.setdefault(group.variant, {"reference": None, "methods": {}, "pending": {}})
        expected = rule.expected_runs(group_runs)
        planned += expected
        finished = sum(run.folder in outcomes for run in group_runs)
        tuning = [run for run in group_runs if rule.tunes_on(run)]
        choice = None
        if all(run.folder in outcomes for run in tuning):
            choice = choose(group_runs, {run.folder: outcomes[run.folder].final_val_loss for run in tuning}, rule)
        if choice is None or not all(run.folder in outcomes for run in choice.runs):
            variant["pending"][group.method] = f"{finished} of {expected} runs finished"
            continue
        variant["methods"][group.method] = _method_entry(choice, outcomes, question_set)
    for variant in settings.values():
        if reference in variant["methods"]:
            variant["reference"] = reference
            for method, entry in variant["methods"].items():
                if method != reference:
                    theirs = variant["methods"][reference]
                    entry["vs_reference"] = _versus(entry["test_loss_by_seed"], theirs["test_loss_by_seed"])
                    entry["rouge_l_vs_reference"] = _versus(entry["rouge_l_by_seed"], theirs["rouge_l_by_seed"])
                    entry["vs_reference_per_round"] = _versus_per_round(entry["test_loss_per_round_by_seed"],
                                                                        theirs["test_loss_per_round_by_seed"])
    configuration = {key: list(dict.fromkeys(outcome.config.get(key) for outcome in outcomes.values()))
                     for key in SHARED_KEYS}
    measured = {"runs": len(outcomes), "planned": planned,
                "run_seconds": sum(o.summary.get("wall_seconds", 0.0) for o in outcomes.values()),
                "final_mmlu_seconds": sum((o.final_mmlu or {}).get("seconds", 0.0) for o in outcomes.values())}
    return {"sweep": str(sweep_dir), "source": plan["source"], "grid": grid, "tune": tune,
            "method_grids": rule.method_grids, "tune_seeds": seeds,
            "final": final, "confidence": CONFIDENCE, "reference": reference, "measured": measured,
            "configuration": configuration,
            "generated": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "settings": settings}


def _method_entry(choice: Choice, outcomes: dict[str, RunOutcome], question_set: dict | None) -> dict:
    chosen = [outcomes[run.folder] for run in choice.runs]
    per_round = list(zip(*(outcome.test_losses() for outcome in chosen)))
    entry = {
        "chosen": choice.chosen,
        "at_grid_edge": choice.at_edge,
        "seeds": len(chosen),
        "test_loss": _interval([o.final_test_loss for o in chosen]),
        "rouge_l": _interval([o.final_rouge_l for o in chosen]),
        "best_test_loss": _interval([o.best_test_loss for o in chosen]),
        "val_loss": _interval([o.final_val_loss for o in chosen]),
        "mmlu": _mmlu([o.mmlu(question_set) for o in chosen]),
        "aggregation_error": _interval([o.mean_over_rounds("aggregation_error") for o in chosen]),
        "broadcast_error": _interval([o.mean_over_rounds("broadcast_error") for o in chosen]),
        "method_measures": _method_measures(chosen),
        "upload_per_round_vs_full": _communication(chosen, "up_vs_full_finetuning"),
        "download_per_round_vs_full": _communication(chosen, "down_vs_full_finetuning"),
        "vs_reference": None,
        "rouge_l_vs_reference": None,
        "vs_reference_per_round": None,
        "runs": [run.folder for run in choice.runs],
        "test_loss_per_round": [_interval(list(losses)) for losses in per_round],
        "tuning": [{"values": c.values, "seeds": len(c.val_losses), "val_loss": mean_interval(c.val_losses).to_json()}
                   for c in choice.candidates],
        # what the paired differences pair
        "test_loss_by_seed": {str(run.point.get(SEED)): outcomes[run.folder].final_test_loss for run in choice.runs},
        "rouge_l_by_seed": {str(run.point.get(SEED)): outcomes[run.folder].final_rouge_l for run in choice.runs},
        "test_loss_per_round_by_seed": {str(run.point.get(SEED)): outcomes[run.folder].test_losses()
                                        for run in choice.runs},
    }
    return entry


def _interval(values: list[float | None]) -> dict | None:
    return None if not values or any(v is None for v in values) else mean_interval(values).to_json()


def _method_measures(chosen: list[RunOutcome]) -> dict[str, dict]:
    """Each measure the method reported in every chosen run, over the seeds."""
    measures = [outcome.method_measures() for outcome in chosen]
    shared = [key for key in measures[0] if all(key in m for m in measures[1:])] if measures else []
    return {key: _interval([m[key] for m in measures]) for key in shared}


def _mmlu(scores: list[tuple[float, int] | None]) -> dict | None:
    """Pooled over the chosen runs that were scored (``[final] seeds`` may leave some out)."""
    scores = [score for score in scores if score is not None]
    if not scores:
        return None
    correct, total = sum(c for c, _ in scores), sum(t for _, t in scores)
    accuracy, low, high = wilson_interval(correct, total)
    return {"acc": accuracy, "ci95": [low, high], "questions": total // len(scores), "runs": len(scores)}


def _communication(chosen: list[RunOutcome], key: str) -> float | None:
    """The ledger's ratio, mean over the seeds."""
    values = [o.communication().get(key) for o in chosen]
    return None if any(v is None for v in values) else sum(values) / len(values)


def _versus(ours: dict[str, float | None], theirs: dict[str, float | None]) -> dict | None:
    """The paired difference ours − theirs over the seeds both measured."""
    seeds = [seed for seed in ours if seed in theirs and ours[seed] is not None and theirs[seed] is not None]
    if not seeds:
        return None
    difference = paired_difference([ours[s] for s in seeds], [theirs[s] for s in seeds])
    return {**difference.to_json(), "significant": difference.significant, "seeds": len(seeds)}


def _versus_per_round(ours: dict[str, list[float | None]], theirs: dict[str, list[float | None]]) -> list:
    """The paired difference at every round (None where no seed scored both): how a gap opens or closes."""
    rounds = min((len(losses) for losses in (*ours.values(), *theirs.values())), default=0)
    return [_versus({seed: losses[r] for seed, losses in ours.items()},
                    {seed: losses[r] for seed, losses in theirs.items()}) for r in range(rounds)]


def _finite(value: Any) -> Any:
    """JSON without NaN (a diverged run): None instead."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


# --- markdown ------------------------------------------------------------------------------------

def interval_text(interval: dict | None, spec: str = ".4f") -> str:
    """``mean [low, high]`` of a ``{"mean", "ci95"}`` entry; the mean alone without an interval."""
    if not interval or interval.get("mean") is None or math.isnan(interval["mean"]):
        return "—"
    if interval["ci95"] is None:
        return format(interval["mean"], spec)
    low, high = interval["ci95"]
    return f"{interval['mean']:{spec}} [{low:{spec}}, {high:{spec}}]"


def _fraction(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.3g} %"


def _accuracy(mmlu: dict | None) -> str:
    if mmlu is None:
        return "—"
    low, high = mmlu["ci95"]
    return f"{mmlu['acc']:.3f} [{low:.3f}, {high:.3f}]"


def _verdict(difference: dict | None) -> str:
    if difference is None:
        return "reference"
    if difference["ci95"] is None:
        return "one seed: no interval"
    return "yes" if difference["significant"] else "no"


def comparison_markdown(comparison: dict) -> str:
    tune = comparison["tune"]
    grid = comparison["grid"]
    seeds = grid.get(SEED)
    reference = comparison["reference"]
    lines = ["# Sweep comparison", "",
             f"{comparison['generated']} · `fedlora compare {comparison['sweep']}` of the sweep "
             f"`{comparison['source']}`.", ""]
    described = []
    if tune:
        own = "; ".join(f"{method}: " + ", ".join(f"{key} ∈ {{{', '.join(map(str, values))}}}"
                                                   for key, values in axes.items())
                        for method, axes in comparison["method_grids"].items())
        described.append("Tuned per (setting, method) on the mean final validation loss over "
                         + (f"seeds {', '.join(map(str, comparison['tune_seeds']))} (the other seeds run at the "
                            "chosen values only)" if comparison["tune_seeds"] else "seeds")
                         + " (records held out of the clients' training; the test set is not looked at): "
                         + "; ".join(f"{key} ∈ {{{', '.join(map(str, grid[key]))}}}" for key in tune)
                         + (f" ({own} instead)" if own else "") + ".")
    if seeds:
        described.append(f"Seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}: a seed fixes the "
                         "validation split, client "
                         "sampling, LoRA initialisation and batch order, so runs of one seed are paired.")
    described.append(f"Test loss: final round, mean over seeds with its 95 % t-interval; best: the lowest over "
                     f"the trained rounds. Δ: final test loss minus {reference}'s, paired by seed, mean with its "
                     "95 % t-interval; significant when the interval excludes 0.")
    if any(entry.get("rouge_l") for variant in comparison["settings"].values()
           for entry in variant["methods"].values()):
        described.append("ROUGE-L: the final model's greedy answers to the first held-out test prompts, mean "
                         "ROUGE-L F over them, then over seeds with its 95 % t-interval; its Δ paired by seed "
                         f"against {reference}'s like the loss's (higher is better).")
    if comparison["final"]:
        described.append("MMLU: scored once on each chosen run's final model, "
                         f"{comparison['final']['questions'] or 'all'} questions each; the interval is Wilson's "
                         "over the questions of all seeds' runs pooled (the same questions every seed, so it "
                         "is narrower than independent questions would give).")
    described.append("Aggregation error: ‖Δ_global − Σ_k p_k Δ_k‖_F / ‖Σ_k p_k Δ_k‖_F over all adapted modules, "
                     "the round's change of the global model against the example-weighted average of the "
                     "clients' changes of the model each started from; broadcast error: how far the adapters "
                     "clients are sent are from the global one (relative, example-weighted); both the mean "
                     "over the trained rounds, then over seeds with a 95 % t-interval; — for the personalised "
                     "methods, which have no global model to compare.")
    described.append("Communication: the ledger's, per client and round, as a fraction of full fine-tuning "
                     "(every participating client sending / receiving all model parameters); for the "
                     "baselines, which exchange nothing, it counts what their clients' updates would be.")
    if configuration := _configuration_sentence(comparison["configuration"]):
        described.append(configuration)
    measured = comparison["measured"]
    described.append(f"Measured: {measured['runs']} of {measured['planned']} runs finished, in "
                     f"{measured['run_seconds'] / 3600:.2f} h (each from its data loading to its summary; a run "
                     f"resumed after a kill counts only its last part), and "
                     f"{measured['final_mmlu_seconds'] / 60:.1f} min of final MMLU.")
    lines += [" ".join(described), ""]
    for name, variant in comparison["settings"].items():
        lines += _setting_lines(name, variant, tune)
    return "\n".join(lines)


def _configuration_sentence(configuration: dict[str, list]) -> str:
    """What the runs share, and the values of a key they do not (``prompt_format`` None: the model's own)."""
    def shown(key: str, value: Any) -> str:
        if key == "prompt_format" and value is None:
            return "auto (the tokenizer's chat template where it has one, else alpaca)"
        return str(value)

    known = {key: [value for value in values if value is not None or key == "prompt_format"]
             for key, values in configuration.items()}
    parts = [f"{key.replace('_', ' ')} {' / '.join(shown(key, value) for value in values)}"
             for key, values in known.items() if values]
    return f"Runs: {', '.join(parts)}." if parts else ""


def _setting_lines(name: str, variant: dict, tune: list[str]) -> list[str]:
    methods = variant["methods"]
    reference = variant["reference"]
    lines = [f"## {name}", ""]
    if methods:
        # generation's columns where it was measured (a sweep whose runs generated)
        generated = any(entry.get("rouge_l") for entry in methods.values())
        rouge_headers = (f"final ROUGE-L [95 % CI] | Δ ROUGE-L vs {reference or 'reference'} [95 % CI] | "
                         if generated else "")
        lines += ["| method | chosen | seeds | final test loss [95 % CI] | best test loss | final val loss | "
                  f"{rouge_headers}MMLU acc [95 % CI] | aggregation error | broadcast error | up / round vs full FT | "
                  f"down / round vs full FT | Δ vs {reference or 'reference'} [95 % CI] | significant |",
                  "|---|---|---:|---:|---:|---:|" + "---:|" * (2 * generated) + "---:|---:|---:|---:|---:|---:|---|"]
        for method, entry in methods.items():
            rouge = [interval_text(entry["rouge_l"]), interval_text(entry["rouge_l_vs_reference"], "+.4f")]
            cells = [method, point_name(entry["chosen"]) if entry["chosen"] else "—", str(entry["seeds"]),
                     interval_text(entry["test_loss"]), interval_text(entry["best_test_loss"]),
                     interval_text(entry["val_loss"]), *(rouge if generated else []), _accuracy(entry["mmlu"]),
                     interval_text(entry["aggregation_error"], ".3g"), interval_text(entry["broadcast_error"], ".3g"),
                     _fraction(entry["upload_per_round_vs_full"]), _fraction(entry["download_per_round_vs_full"]),
                     interval_text(entry["vs_reference"], "+.4f"),
                     _verdict(entry["vs_reference"]) if reference else "—"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"- {statement}" for statement in _statements(methods, reference)]
        lines.append("")
        lines += _measures_lines(methods)
        lines += _per_round_table(methods, reference)
        if tune:
            lines += _tuning_table(methods)
    for method, note in variant["pending"].items():
        lines.append(f"- not finished, left out: {method} ({note})")
    if variant["pending"]:
        lines.append("")
    return lines


def _statements(methods: dict, reference: str | None) -> list[str]:
    """What the table shows, in words: which differences are significant and which are not."""
    statements = []
    finite = {m: e["test_loss"]["mean"] for m, e in methods.items()
              if e["test_loss"] is not None and not math.isnan(e["test_loss"]["mean"])}
    if finite:
        best = min(finite, key=finite.get)
        statements.append(f"Lowest mean final test loss: {best} ({finite[best]:.4f}).")
    if reference is None:
        statements.append("The reference method is not in this setting: no paired differences.")
        return statements
    if finite and best != reference:
        better = sorted((m for m in finite if finite[m] < finite.get(reference, math.inf)), key=finite.get)
        statements.append(f"**{reference} does not have the lowest mean final test loss here**: "
                          f"{', '.join(better)} {'is' if len(better) == 1 else 'are'} lower on average.")
    compared = {m: e["vs_reference"] for m, e in methods.items() if m != reference and e["vs_reference"]}
    with_interval = {m: d for m, d in compared.items() if d["ci95"] is not None}

    def listing(chosen: dict) -> str:
        return ", ".join(f"{m} ({interval_text(d, '+.4f')})" for m, d in chosen.items()) or "none"

    lower = {m: d for m, d in with_interval.items() if d["significant"] and d["mean"] < 0}
    higher = {m: d for m, d in with_interval.items() if d["significant"] and d["mean"] > 0}
    unclear = {m: d for m, d in with_interval.items() if not d["significant"]}
    statements.append(f"Significantly lower final test loss than {reference} (interval below 0): {listing(lower)}.")
    statements.append(f"Significantly higher than {reference} (interval above 0): {listing(higher)}.")
    statements.append(f"Not significantly different from {reference} (interval contains 0): {listing(unclear)}.")
    single = [m for m in compared if m not in with_interval]
    if single:
        statements.append(f"One seed only, so no interval and no verdict: {', '.join(single)}.")
    edges = [f"{m} ({point_name({key: e['chosen'][key] for key in e['at_grid_edge']})})"
             for m, e in methods.items() if e["at_grid_edge"]]
    if edges:
        statements.append("Chosen at the edge of its grid, so the best value may lie outside it: "
                          + ", ".join(edges) + ".")
    return statements


def _measures_lines(methods: dict) -> list[str]:
    """What each method reported of its own aggregation, beside the loss it reached."""
    measured = {method: entry["method_measures"] for method, entry in methods.items() if entry["method_measures"]}
    if not measured:
        return []
    lines = ["Each method's own measures (what its aggregation reported each round: mean over the trained "
             "rounds, then over seeds with its 95 % t-interval):", ""]
    for method, measures in measured.items():
        lines.append(f"- {method}: " + "; ".join(f"`{key}` {_measure_text(interval)}"
                                                 for key, interval in measures.items()))
    return lines + [""]


def _measure_text(interval: dict | None) -> str:
    """A measure with its interval; the value alone where every seed measured the same."""
    if interval is not None and interval["ci95"] is not None and interval["ci95"][0] == interval["ci95"][1]:
        return format(interval["mean"], ".4g")
    return interval_text(interval, ".4g")


def _per_round_table(methods: dict, reference: str | None) -> list[str]:
    """Δ vs the reference at every trained round the test set scored, where that is more than the last."""
    compared = {method: entry["vs_reference_per_round"] for method, entry in methods.items()
                if method != reference and entry.get("vs_reference_per_round")}
    scored = sorted({r for per_round in compared.values() for r, d in enumerate(per_round) if r > 0 and d})
    if len(scored) < 2:
        return []
    lines = [f"Δ test loss vs {reference} at each scored round (paired by seed, mean with its 95 % t-interval; "
             "bold where the interval excludes 0; each round is tested on its own, so among many rounds one bold "
             "cell can be chance):", "",
             "| method | " + " | ".join(f"round {r}" for r in scored) + " |", "|---|" + "---:|" * len(scored)]
    for method, per_round in compared.items():
        cells = [per_round[r] if r < len(per_round) else None for r in scored]
        lines.append(f"| {method} | " + " | ".join(
            f"**{interval_text(d, '+.4f')}**" if d and d["significant"] else interval_text(d, "+.4f")
            for d in cells) + " |")
    return lines + [""]


def _ascending(values: dict[str, Any]) -> tuple:
    """A sort key putting tuned values in ascending order, axis by axis: numbers by size, then
    anything else by its text (a method's own grid lists values beside the shared grid's)."""
    return tuple((0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool)
                 else (1, 0, str(value)) for value in values.values())


def _tuning_table(methods: dict) -> list[str]:
    points = {point_name(c["values"]): c["values"] for e in methods.values() for c in e["tuning"]}
    labels = sorted(points, key=lambda label: _ascending(points[label]))
    lines = ["Mean final validation loss over seeds at each tuned value (the chosen one in bold):", "",
             "| method | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for method, entry in methods.items():
        cells = {point_name(c["values"]): c["val_loss"]["mean"] for c in entry["tuning"]}
        chosen = point_name(entry["chosen"])
        row = [("—" if label not in cells else
                f"**{cells[label]:.4f}**" if label == chosen else f"{cells[label]:.4f}") for label in labels]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines + [""]


# --- plot ------------------------------------------------------------------------------------------

def plot_comparison(comparison: dict, path: Path) -> None:
    """Test loss per round, mean over seeds with its 95 % band, one panel per setting."""
    settings = comparison["settings"]
    fig = Figure(figsize=(6.5 * max(1, len(settings)), 4.5), layout="constrained")
    axes = fig.subplots(1, max(1, len(settings)), squeeze=False)[0]
    for ax, (name, variant) in zip(axes, settings.items()):
        for index, (method, entry) in enumerate(variant["methods"].items()):
            points = [(r, i) for r, i in enumerate(entry["test_loss_per_round"]) if i is not None]
            if not points:
                continue
            plot_mean_with_band(ax, points, color=f"C{index}",
                                label=f"{method} ({point_name(entry['chosen'])})" if entry["chosen"] else method)
        ax.set(title=name, ylabel="test loss")
        finish_round_axis(ax, empty="no finished method")
    fig.savefig(path, dpi=120)

