"""The ``fedlora`` command line: run, eval, export, report, methods, sweep, compare."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.text import Text

from fedlora.engine.config import ConfigError, RunConfig
from fedlora.errors import FedloraError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Federated LoRA fine-tuning of LLMs with exact aggregation.")


def make_console() -> Console:
    """The CLI's console. It reads no markup: what it prints holds paths, records and formulas
    like FLoRA's "[A_1; …]", which rich would take for tags and drop; styles are set as such.
    Output piped to a file or `tee` has no width, and rich would assume 80 columns and cut the
    metrics table's cells; it gets room for the whole table unless COLUMNS says otherwise."""
    console = Console(markup=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(markup=False, width=160)
    return console


console = make_console()
# PEFT calls a transformers property that transformers 5 deprecates; nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
#: mistakes a user can make: printed as one line, never a traceback
USER_ERRORS = (FedloraError, FileNotFoundError)

Opt = typer.Option


def _fail(error: Exception) -> None:
    # soft_wrap: one line however long (rich would break a long path inside a word)
    console.print(Text.assemble(("error:", "bold red"), f" {error}"), highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _given(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags the user actually gave (typer passes None for the others)."""
    return {key: value for key, value in flags.items() if value is not None}


def _option_type(annotation: Any) -> type:
    """The command-line type of a RunConfig field: lists are comma-separated and dicts JSON
    strings (the config loader parses both), the rest as declared."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):  # X | None
        annotation = next(t for t in typing.get_args(annotation) if t is not type(None))
    kind = typing.get_origin(annotation) or annotation
    return str if kind in (list, dict) else kind


def run_options() -> list[inspect.Parameter]:
    """One ``--flag`` per RunConfig field, with the field's help text; None where not given."""
    hints = typing.get_type_hints(RunConfig)
    return [inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=Annotated[Optional[_option_type(hints[spec.name])],
                                                   typer.Option(help=spec.metadata.get("help", ""))])
            for spec in dataclasses.fields(RunConfig)]


def run(config_file: Optional[Path] = None, resume: Optional[Path] = None, **flags: Any) -> None:
    """Federated LoRA fine-tuning; writes metrics.jsonl, summary.json, report.md, curves.png."""
    flags = _given(flags)
    if resume is not None and (config_file is not None or set(flags) - {"rounds"}):
        _fail(ConfigError("--resume continues a run with its saved configuration; only --rounds may change"))
    import fedlora
    from fedlora.runtime.flower.deployment import FlowerRunError
    from fedlora.runtime.observer import RichObserver

    try:
        with RichObserver(console) as observer:
            if resume is not None:
                result = fedlora.resume(resume, rounds=flags.get("rounds"), observers=[observer])
            else:
                result = fedlora.run(config_file, observers=[observer], **flags)
    except (*USER_ERRORS, FlowerRunError) as error:  # a Flower run's error names the log to read
        _fail(error)
    _print_summary(result)


run.__signature__ = inspect.Signature([
    inspect.Parameter("config_file", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                      annotation=Annotated[Optional[Path], typer.Argument(help="TOML file; flags override its keys")]),
    *run_options(),
    inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=Annotated[Optional[Path], typer.Option(help="continue the run in this folder")]),
])
run.__annotations__ = {param.name: param.annotation for param in run.__signature__.parameters.values()}
app.command()(run)


def _print_summary(result) -> None:
    from fedlora.report import console_table, format_bytes, generation_lines

    console.print(console_table(result.rows, title=f"{result.summary['method']}: all rounds"))
    for line in generation_lines(result.rows, width=max(40, console.width - 4)):
        console.print(f"  {line}")
    comm = result.summary["communication"]
    console.print(f"communication: up {format_bytes(comm['bytes_up'])} "
                  f"({comm['up_vs_full_finetuning']:.4f} of full fine-tuning), down "
                  f"{format_bytes(comm['bytes_down'])} ({comm['down_vs_full_finetuning']:.4f}) "
                  f"over {comm['participations']} client-rounds")
    console.print(f"outputs in {result.run_dir}/: metrics.jsonl summary.json report.md curves.png")


@app.command()
def methods(name: Annotated[Optional[str], typer.Argument(help="one method: its options and what it declares")] = None
            ) -> None:
    """List the aggregation methods and baselines: exactness, ranks, DP, what travels, paper."""
    from rich.table import Table

    from fedlora.aggregation.registry import describe_methods
    from fedlora.aggregation.measured import measured_errors

    described, errors = describe_methods(), measured_errors()
    if name is not None:
        if name not in described:
            _fail(ConfigError(f"unknown method {name!r}; choose one of {', '.join(described)}"))
        described = {name: described[name]}
    table = Table(title="methods")
    for header in ("method", "exact", "measured\naggregation error", "ranks", "client-level\nDP",
                   "DP-SGD\nclients", "personalised", "a client sends", "it receives"):
        table.add_column(header)
    for facts in described.values():
        table.add_row(facts.name, {True: "exact", False: "inexact", None: "—"}[facts.exact],
                      errors.get(facts.name, "—"), "any" if facts.heterogeneous_ranks else "one",
                      "yes" if facts.client_dp else "no", "yes" if facts.sample_dp else "no",
                      "yes" if facts.personalised else "no",
                      facts.sends, facts.receives)
    console.print(table)
    for facts in described.values():
        paper = f" ({facts.paper})" if facts.paper else ""
        console.print(Text.assemble((f"{facts.name:<12}", "bold"), f" {facts.summary}{paper}"))
        if name is not None:
            for option in facts.options:
                console.print(f"  option {option.name} = {option.default!r}: {option.help}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run folder, or a folder of run folders")]) -> None:
    """Write report.md and curves.png for a run, or compare every run under a folder."""
    from fedlora.engine.metrics import METRICS_FILE
    from fedlora.report import compare_runs, write_report

    try:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir}: no such folder")
        written = write_report(run_dir) if (run_dir / METRICS_FILE).exists() else compare_runs(run_dir)
    except USER_ERRORS as error:
        _fail(error)
    for path in written:
        console.print(f"wrote {path}")


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run folder: evaluates its latest global model")],
    test_data: Annotated[Optional[str], Opt(help="held-out records (default: the run's)")] = None,
    test_limit: Annotated[Optional[int], Opt(help="loss on the first N test records")] = None,
    generation_limit: Annotated[Optional[int], Opt(help="answer the first N test records (0: none)")] = None,
    max_new_tokens: Annotated[Optional[int], Opt(help="tokens per generated answer at most")] = None,
    mmlu: Annotated[Optional[str], Opt(help="MMLU file in FLoRA's format (fedlora's fast scoring)")] = None,
    mmlu_limit: Annotated[Optional[int], Opt(help="the first N MMLU questions")] = None,
    tasks: Annotated[Optional[str], Opt(help="lm-evaluation-harness tasks, comma-separated: fedlora_mmlu, "
                                             "fedlora_generation or any lm-eval task available offline")] = None,
    tasks_limit: Annotated[Optional[int], Opt(help="documents per lm-eval task")] = None,
) -> None:
    """Evaluate a run's global model: held-out loss, generation (ROUGE-L, exact match), MMLU,
    lm-eval tasks; prints every metric as JSON."""
    from fedlora.engine.restore import evaluate_restored, restore_global_model
    from fedlora.runtime.observer import RichObserver

    try:
        restored = restore_global_model(run_dir)
        overrides = _given(dict(test_data=test_data, test_limit=test_limit, generation_limit=generation_limit,
                                max_new_tokens=max_new_tokens, mmlu=mmlu, mmlu_limit=mmlu_limit, eval_tasks=tasks,
                                tasks_limit=tasks_limit))
        # notes and progress on standard error: standard output is the JSON alone
        with RichObserver(Console(stderr=True, markup=False)) as observer:
            metrics = evaluate_restored(restored, overrides, log=observer.log, progress=observer.evaluation_progress)
    except USER_ERRORS as error:
        _fail(error)
    console.print_json(json.dumps({k: v for k, v in metrics.items() if k != "mmlu_per_subject"}))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run folder")],
    merged: Annotated[Optional[Path], Opt(help="write the merged model with save_pretrained here")] = None,
    adapter: Annotated[Optional[Path], Opt(help="write a PEFT adapter of the accumulated update here")] = None,
    rank: Annotated[Optional[int], Opt(help="rank of the exported adapter")] = None,
) -> None:
    """Export the global model, merged or as a low-rank PEFT adapter (via SVD), with a model card."""
    if (merged is None) == (adapter is None):
        _fail(ConfigError("give exactly one of --merged OUT or --adapter OUT --rank R"))
    if adapter is not None and (rank is None or rank < 1):
        _fail(ConfigError("--adapter needs --rank R with R ≥ 1"))
    from fedlora.engine.restore import export_adapter, export_merged, restore_global_model  # after the checks

    try:
        restored = restore_global_model(run_dir)
        if merged is not None:
            export_merged(restored, merged)
            console.print(f"wrote merged model to {merged}")
        else:
            error = export_adapter(restored, adapter, rank)
            console.print(f"wrote rank-{rank} adapter to {adapter}; relative Frobenius error of the "
                          f"accumulated update: {error:.3e}")
    except USER_ERRORS as error:
        _fail(error)


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="sweep TOML: base config, [run], [grid], [tune], [settings.*]")],
    out: Annotated[Path, Opt(help="sweep folder: one run folder per combination, then comparison.*")],
    dry_run: Annotated[bool, Opt(help="check the file and list what would run, run nothing")] = False,
) -> None:
    """Run every combination of a sweep file on one loaded model; again on OUT: continue it."""
    from fedlora.sweep import RichSweepObserver, load_sweep, run_sweep, write_comparison
    from fedlora.sweep.outcomes import is_finished
    from fedlora.sweep.tuning import groups

    try:
        plan = load_sweep(sweep_file)
        if dry_run:
            finished = sum(is_finished(out / run.folder) for run in plan.runs)
            for run in plan.runs:
                state = ("done" if is_finished(out / run.folder) else
                         "todo" if plan.tuning.tunes_on(run) else "if chosen")
                console.print(f"{state:<9} {run.folder}")
            expected = sum(plan.tuning.expected_runs(runs) for runs in groups(plan.runs, plan.tuning.keys).values())
            conditional = expected < len(plan.runs)
            console.print(f"{expected} runs, {finished} finished, every configuration valid"
                          + ("; an 'if chosen' run runs only where tuning chooses its values" if conditional else ""))
            return
        with RichSweepObserver(console) as observer:
            result = run_sweep(plan, out, observer)
        written = write_comparison(out)
    except USER_ERRORS as error:
        _fail(error)
    console.print(f"{len(result.ran)} runs ran, {len(result.resumed)} resumed, {len(result.skipped)} were done; "
                  f"wrote {', '.join(str(path) for path in written)}")


@app.command()
def compare(
    sweep_dir: Annotated[Path, typer.Argument(help="the --out folder of `fedlora sweep`")],
    reference: Annotated[Optional[str], Opt(help="method the others are compared with (default: the "
                                                 "sweep file's, else flora)")] = None,
) -> None:
    """Compare a sweep's methods: comparison.md, comparison.png and comparison.json in the folder."""
    from fedlora.sweep import write_comparison

    try:
        written = write_comparison(sweep_dir, reference)
    except USER_ERRORS as error:
        _fail(error)
    for path in written:
        console.print(f"wrote {path}")
