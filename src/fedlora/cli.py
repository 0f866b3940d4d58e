"""The ``fedlora`` command line: run, eval, export, report, methods, sweep, compare."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from fedlora.aggregation import AggregationError, available_aggregators
from fedlora.data import DataError
from fedlora.engine.config import BASELINES, ConfigError, RunConfig, load_config, load_saved_config, save_config, \
    with_absolute_paths
from fedlora.models import ModelError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Federated LoRA fine-tuning of LLMs with exact aggregation.")


def make_console() -> Console:
    """The CLI's console. It reads no markup: what it prints holds paths, records and formulas
    like FLoRA's "[A_1; …]", which rich would take for tags and drop; styles are set as such.
    Output piped to a file or `tee` has no width, and rich would assume 80 columns and cut the
    metrics table's cells; it gets room for the whole table unless COLUMNS says otherwise."""
    console = Console(markup=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(markup=False, width=120)
    return console


console = make_console()
# PEFT calls a transformers property that transformers 5 deprecates; nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
#: mistakes a user can make: printed as one line, never a traceback
USER_ERRORS = (ConfigError, DataError, ModelError, AggregationError, FileNotFoundError)
CONFIG_FILE = "config.json"

Opt = typer.Option


def _fail(error: Exception) -> None:
    console.print(Text.assemble(("error:", "bold red"), f" {error}"), highlight=False)
    raise typer.Exit(2)


def _overrides(**flags) -> dict:
    """The flags the user actually gave (typer passes None for the others)."""
    return {key: value for key, value in flags.items() if value is not None}


def _prepare_run_dir(config: RunConfig) -> Path:
    run_dir = Path(config.out)
    if (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with `fedlora run --resume {run_dir}` "
                          "or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG_FILE)  # before any work, so even round 0 can resume
    return run_dir


@app.command()
def run(
    config_file: Annotated[Optional[Path], typer.Argument(help="TOML file; flags override its keys")] = None,
    model: Annotated[Optional[str], Opt(help="smollm2-135m, tiny-llama, a HF id or a local dir")] = None,
    gguf_file: Annotated[Optional[str], Opt(help="GGUF file inside --model's directory")] = None,
    data: Annotated[Optional[str], Opt(help="dir of local_training_*.json, a .json/.jsonl file or a HF id")] = None,
    test_data: Annotated[Optional[str], Opt(help="held-out records for eval loss")] = None,
    mmlu: Annotated[Optional[str], Opt(help="MMLU file in FLoRA's format")] = None,
    method: Annotated[Optional[str], Opt(help="aggregation method or baseline (see `fedlora methods`)")] = None,
    clients: Annotated[Optional[int], Opt(help="number of clients (first N files, or N splits)")] = None,
    fraction: Annotated[Optional[float], Opt(help="fraction of clients sampled per round")] = None,
    clients_per_round: Annotated[Optional[int], Opt(help="clients sampled per round (overrides fraction)")] = None,
    rounds: Annotated[Optional[int], Opt(help="federated rounds")] = None,
    ranks: Annotated[Optional[str], Opt(help="LoRA rank for all clients, or one per client: 64,32,16")] = None,
    alpha: Annotated[Optional[float], Opt(help="LoRA alpha for all clients (default 2×rank)")] = None,
    local_steps: Annotated[Optional[int], Opt(help="optimizer steps per client per round")] = None,
    local_epochs: Annotated[Optional[float], Opt(help="epochs per client per round, instead of steps")] = None,
    batch_size: Annotated[Optional[int], Opt()] = None,
    grad_accum: Annotated[Optional[int], Opt()] = None,
    max_length: Annotated[Optional[int], Opt(help="tokens per example; longer ones are truncated")] = None,
    lr: Annotated[Optional[float], Opt()] = None,
    seed: Annotated[Optional[int], Opt()] = None,
    test_limit: Annotated[Optional[int], Opt(help="evaluate loss on the first N test records")] = None,
    mmlu_limit: Annotated[Optional[int], Opt(help="score the first N MMLU questions")] = None,
    mmlu_every: Annotated[Optional[int], Opt(help="MMLU every K rounds (default: final round only)")] = None,
    max_update_norm: Annotated[Optional[float], Opt(help="reject updates with larger ‖ΔW‖_F")] = None,
    min_clients: Annotated[Optional[int], Opt(help="skip a round with fewer usable updates")] = None,
    runtime: Annotated[Optional[str], Opt(help="inprocess (default) or flower")] = None,
    superlink: Annotated[Optional[str], Opt(help="HOST:PORT of an existing Flower SuperLink")] = None,
    root_certificates: Annotated[Optional[str], Opt(help="CA certificate of --superlink (TLS)")] = None,
    data_on_nodes: Annotated[Optional[bool], Opt(help="with --superlink: the SuperNodes hold the clients' "
                                                      "records, the server reads none")] = None,
    out: Annotated[Optional[str], Opt(help="run folder")] = None,
    resume: Annotated[Optional[Path], Opt(help="continue the run in this folder")] = None,
) -> None:
    """Federated LoRA fine-tuning; writes metrics.jsonl, summary.json, report.md, curves.png."""
    flags = _overrides(model=model, gguf_file=gguf_file, data=data, test_data=test_data, mmlu=mmlu,
                       method=method, clients=clients, fraction=fraction, clients_per_round=clients_per_round,
                       rounds=rounds, ranks=ranks, alpha=alpha, local_steps=local_steps, local_epochs=local_epochs,
                       batch_size=batch_size,
                       grad_accum=grad_accum, max_length=max_length, lr=lr, seed=seed, test_limit=test_limit,
                       mmlu_limit=mmlu_limit, mmlu_every=mmlu_every, max_update_norm=max_update_norm,
                       min_clients=min_clients, runtime=runtime, superlink=superlink,
                       root_certificates=root_certificates, data_on_nodes=data_on_nodes, out=out)
    try:
        if resume is not None:
            config, run_dir = _resume_config(resume, config_file, flags)
        else:
            config = with_absolute_paths(load_config(config_file, flags))
            run_dir = _prepare_run_dir(config)
        _execute(config, run_dir)
    except USER_ERRORS as error:
        _fail(error)


def _resume_config(run_dir: Path, config_file: Path | None, flags: dict) -> tuple[RunConfig, Path]:
    if config_file is not None or set(flags) - {"rounds"}:
        raise ConfigError("--resume continues a run with its saved configuration; only --rounds may change")
    config = load_saved_config(run_dir / CONFIG_FILE)
    if "rounds" in flags:
        config = load_config(None, {**config.to_dict(), "rounds": flags["rounds"]})
        save_config(config, run_dir / CONFIG_FILE)
    return config, run_dir


def _execute(config: RunConfig, run_dir: Path) -> None:
    from fedlora.report import write_report, write_summary
    from fedlora.runtime.observer import RichObserver

    with RichObserver(config.rounds, console) as observer:
        if config.runtime == "flower":
            from fedlora.runtime.flower.deployment import FlowerRunError
            from fedlora.runtime.flower.runner import run_flower
            try:
                summary = run_flower(config, run_dir, observer)
            except FlowerRunError as error:  # names the log to read
                _fail(error)
        else:
            summary = _run_inprocess(config, run_dir, observer)
    write_summary(run_dir, summary)
    write_report(run_dir)
    _print_summary(run_dir, summary)


def _run_inprocess(config: RunConfig, run_dir: Path, observer) -> dict:
    from fedlora.engine.setup import prepare_run
    from fedlora.runtime.inprocess import run_inprocess

    mmlu_task = observer.progress.add_task("MMLU", total=None, note="", visible=False)

    def mmlu_progress(done: int, total: int) -> None:
        observer.progress.update(mmlu_task, completed=done, total=total, visible=done < total)

    setup = prepare_run(config, run_dir, log=observer.log, mmlu_progress=mmlu_progress)
    return run_inprocess(setup, observer)


def _print_summary(run_dir: Path, summary: dict) -> None:
    from fedlora.report import console_table, format_bytes, read_metrics

    console.print(console_table(read_metrics(run_dir), title=f"{summary['method']}: all rounds"))
    comm = summary["communication"]
    console.print(f"communication: up {format_bytes(comm['bytes_up'])} "
                  f"({comm['up_vs_full_finetuning']:.4f} of full fine-tuning), down "
                  f"{format_bytes(comm['bytes_down'])} ({comm['down_vs_full_finetuning']:.4f}) "
                  f"over {comm['participations']} client-rounds")
    console.print(f"outputs in {run_dir}/: metrics.jsonl summary.json report.md curves.png")


@app.command()
def methods() -> None:
    """List the aggregation methods and baselines."""
    from fedlora.aggregation import aggregator_class

    for name in available_aggregators():
        doc = (aggregator_class(name).__doc__ or "").strip().splitlines()[0]
        console.print(Text.assemble((f"{name:<12}", "bold"), f" {doc}"))
    for name in BASELINES:
        console.print(Text.assemble((f"{name:<12}", "bold"), " baseline: "
                                    + ("one client holding all data, same total steps" if name == "centralized"
                                       else "every client trains alone, no aggregation")))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run folder, or a folder of run folders")]) -> None:
    """Write report.md and curves.png for a run, or compare every run under a folder."""
    from fedlora.report import METRICS_FILE, compare_runs, write_report

    if not run_dir.is_dir():
        _fail(FileNotFoundError(f"{run_dir}: no such folder"))
    written = write_report(run_dir) if (run_dir / METRICS_FILE).exists() else compare_runs(run_dir)
    for path in written:
        console.print(f"wrote {path}")


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run folder: evaluates its latest global model")],
    test_data: Annotated[Optional[str], Opt()] = None,
    mmlu: Annotated[Optional[str], Opt()] = None,
    mmlu_limit: Annotated[Optional[int], Opt()] = None,
    test_limit: Annotated[Optional[int], Opt()] = None,
) -> None:
    """Evaluate a run's global model: held-out loss and MMLU accuracy."""
    from fedlora.engine.restore import evaluate_restored, restore_global_model

    try:
        restored = restore_global_model(run_dir)
        overrides = _overrides(test_data=test_data, mmlu=mmlu, mmlu_limit=mmlu_limit, test_limit=test_limit)
        metrics = evaluate_restored(restored, overrides)
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
    """Export the global model, merged or as a low-rank PEFT adapter (via SVD)."""
    from fedlora.engine.restore import export_adapter, export_merged, restore_global_model

    if (merged is None) == (adapter is None):
        _fail(ConfigError("give exactly one of --merged OUT or --adapter OUT --rank R"))
    if adapter is not None and (rank is None or rank < 1):
        _fail(ConfigError("--adapter needs --rank R with R ≥ 1"))
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

    try:
        plan = load_sweep(sweep_file)
        if dry_run:
            finished = sum(is_finished(out / run.folder) for run in plan.runs)
            for run in plan.runs:
                console.print(f"{'done' if is_finished(out / run.folder) else 'todo'}  {run.folder}")
            console.print(f"{len(plan.runs)} runs, {finished} finished, every configuration valid")
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
