"""Quality benchmark: held-out loss, MMLU and communication of every method on the Dolly clients.

SmolLM2-135M-Instruct is loaded once and shared by all runs (the base weights a run merges
into are restored before the next). Two settings on the 9 non-IID Dolly clients:

- heterogeneous ranks 64,32,16,16,8,8,4,4,4: flora, zeropad, flexlora, centralized, local;
- homogeneous rank 16: flora, fedit, zeropad, ffa, rolora, flexlora, fedex, centralized, local;

and a RoLoRA scaling study: the pooled Dolly records re-split by Dirichlet over category into
3, 10 and 20 clients, rank 4, methods rolora, fedit, ffa, every client in every round.

Budgets: the default fits about an hour on 2 CPU cores; ``--short`` about half an hour;
``--quick`` smoke-tests the script in a few minutes; ``--scale`` holds the paper's settings for a
GPU machine (TinyLlama-1.1B-Chat, 3 rounds × 1 local epoch on all data, batch 16, max_length 512,
the whole test set and MMLU).
Before training, one step and one evaluation are timed and the total time predicted.

Run from the repository root: ``make bench-quality``. Writes benchmarks/results/quality.md and
quality.png and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common import DOLLY, DOLLY_TEST, MMLU, RESULTS, dolly_client_files, environment_line, markdown_table, \
    pool_dolly, require_shared_data, run_federation, write_result

SEED = 0  # every run: client sampling, LoRA init, batch order; also the MMLU subset and the splits
BASELINES = ("centralized", "local")
SCALING_CLIENTS = (3, 10, 20)
SCALING_RANK = 4
SCALING_METHODS = ("rolora", "fedit", "ffa")
DIRICHLET_ALPHA = 0.5


@dataclass(frozen=True)
class Setting:
    key: str
    title: str
    ranks: tuple[int, ...]
    methods: tuple[str, ...]


SETTINGS = (
    Setting("heterogeneous", "Heterogeneous ranks 64,32,16,16,8,8,4,4,4", (64, 32, 16, 16, 8, 8, 4, 4, 4),
            ("flora", "zeropad", "flexlora", "centralized", "local")),
    Setting("homogeneous", "Homogeneous rank 16", (16,),
            ("flora", "fedit", "zeropad", "ffa", "rolora", "flexlora", "fedex", "centralized", "local")),
)


@dataclass(frozen=True)
class Training:
    """The RunConfig keys a budget fixes for one part of the benchmark."""

    rounds: int
    local_steps: int | None
    batch_size: int
    max_length: int
    test_limit: int | None  # None: the whole test set
    clients_per_round: int | None = None  # None: every client, every round
    local_epochs: float | None = None


@dataclass(frozen=True)
class Budget:
    name: str
    model: str
    main: Training  # the two Dolly settings
    scaling: Training  # the RoLoRA scaling study
    mmlu_questions: int | None  # a fixed seeded subset; None: all questions


# The hour was sized on this machine (2 cores, 2 threads, nothing else running) from the
# calibration below: a step of batch 4 × max_length 128 took 1.55 s, of batch 2 × 96 0.63 s; a
# held-out record 0.165 s (0.12 s at 96 tokens); an MMLU question 0.32 s. With four rounds in the
# Dolly settings (five would not leave room for the rest of a session) that predicts ~45 min of
# training and evaluation, plus ~4 min of loading and checkpoints. The local baseline evaluates all
# 9 client models every round, which is why the evaluation sets are small. Every run re-measures
# these and reports its prediction next to the measured total.
BUDGETS = {
    "hour": Budget("hour", "smollm2-135m",
                   main=Training(rounds=4, local_steps=5, batch_size=4, max_length=128, test_limit=24,
                                 clients_per_round=3),
                   # four rounds: RoLoRA trains B in two of them and A in the other two
                   scaling=Training(rounds=4, local_steps=2, batch_size=2, max_length=96, test_limit=24),
                   mmlu_questions=40),
    # half an hour: three rounds, fewer steps and smaller evaluation sets
    "short": Budget("short", "smollm2-135m",
                    main=Training(rounds=3, local_steps=3, batch_size=4, max_length=128, test_limit=16,
                                  clients_per_round=3),
                    # two rounds: RoLoRA trains B in one and A in the other
                    scaling=Training(rounds=2, local_steps=1, batch_size=2, max_length=96, test_limit=16),
                    mmlu_questions=24),
    "quick": Budget("quick", "smollm2-135m",
                    main=Training(rounds=2, local_steps=1, batch_size=1, max_length=32, test_limit=4,
                                  clients_per_round=2),
                    scaling=Training(rounds=2, local_steps=1, batch_size=1, max_length=32, test_limit=4),
                    mmlu_questions=4),
    "scale": Budget("scale", "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                    main=Training(rounds=3, local_steps=None, local_epochs=1.0, batch_size=16, max_length=512,
                                  test_limit=None),
                    scaling=Training(rounds=3, local_steps=None, local_epochs=1.0, batch_size=16,
                                     max_length=512, test_limit=None),
                    mmlu_questions=None),
}


@dataclass(frozen=True)
class RunSpec:
    """One federated run of the plan: where it is reported, and its full configuration."""

    part: str  # "main" or "scaling": which Training of the budget it uses
    setting: str  # a Setting key, or "scaling"
    method: str
    clients: int
    records: int  # training records over all clients
    values: dict

    @property
    def label(self) -> str:
        return f"{self.setting} {self.method}" + (f" {self.clients} clients" if self.part == "scaling" else "")


# --- the plan ---------------------------------------------------------------------------------


def plan_runs(budget: Budget, mmlu_file: Path, pooled: Path) -> list[RunSpec]:
    records = len(json.loads(pooled.read_text()))  # the Dolly clients, pooled or not
    common = {"model": budget.model, "seed": SEED}
    main = {**common, **asdict(budget.main), "data": str(DOLLY), "mmlu": str(mmlu_file)}
    scaling = {**common, **asdict(budget.scaling), "data": str(pooled), "test_data": str(DOLLY_TEST),
               "partition": "dirichlet", "dirichlet_alpha": DIRICHLET_ALPHA, "ranks": [SCALING_RANK]}
    runs = [RunSpec("main", setting.key, method, len(dolly_client_files()), records,
                    {**main, "method": method, "ranks": list(setting.ranks)})
            for setting in SETTINGS for method in setting.methods]
    runs += [RunSpec("scaling", "scaling", method, clients, records, {**scaling, "method": method, "clients": clients})
             for clients in SCALING_CLIENTS for method in SCALING_METHODS]
    return runs


def check_plan(runs: list[RunSpec]) -> None:
    """Every configuration is valid before anything is loaded."""
    from fedlora.engine.config import build_config

    for run in runs:
        build_config(run.values, source=f"benchmark run {run.label}")


def write_mmlu_subset(destination: Path, size: int | None) -> Path:
    """A fixed, seeded sample of the MMLU questions (the file is ordered by subject)."""
    if size is None:
        return MMLU
    questions = json.loads(MMLU.read_text())
    chosen = sorted(random.Random(SEED).sample(range(len(questions)), size))
    destination.write_text(json.dumps([questions[index] for index in chosen]))
    return destination


# --- calibration: one step and one evaluation, timed ------------------------------------------

CALIBRATION_STEPS = 2  # timed, after one warm-up step
CALIBRATION_RECORDS = 8


def seconds_per_step(model, tokenizer, training: Training) -> float:
    from fedlora.data import LazyTokenizedRecords, load_records
    from fedlora.engine.client import LocalTrainer
    from fedlora.engine.task import ClientTask
    from fedlora.eval.loss import pad_token_id

    examples = LazyTokenizedRecords(tokenizer, load_records(dolly_client_files()[0]), training.max_length)
    trainer = LocalTrainer(model, pad_token_id(tokenizer), target_modules=["q_proj", "v_proj"],
                           batch_size=training.batch_size)
    task = ClientTask(client_id="calibration", server_round=1, rank=16, alpha=32.0, trainable=frozenset("AB"),
                      init_seed=SEED, data_seed=SEED, local_steps=1 + CALIBRATION_STEPS, start=None)
    marks: list[float] = []
    trainer.train(task, examples, on_step=lambda *_: marks.append(time.perf_counter()))
    return (marks[-1] - marks[0]) / CALIBRATION_STEPS


def seconds_per_record(model, tokenizer, training: Training) -> float:
    from fedlora.data import load_records, tokenize_records
    from fedlora.eval.loss import evaluate_loss_tokenized, pad_token_id

    examples, _ = tokenize_records(tokenizer, load_records(DOLLY_TEST)[:CALIBRATION_RECORDS], training.max_length)
    started = time.perf_counter()
    evaluate_loss_tokenized(model, examples, pad_token_id(tokenizer))
    return (time.perf_counter() - started) / len(examples)


def seconds_per_question(model, tokenizer, mmlu_file: Path) -> float:
    from fedlora.data import load_mmlu
    from fedlora.eval import evaluate_mmlu

    questions = load_mmlu(mmlu_file, limit=CALIBRATION_RECORDS)
    started = time.perf_counter()
    evaluate_mmlu(model, tokenizer, questions)
    return (time.perf_counter() - started) / len(questions)


def calibrate(loaded: tuple, budget: Budget, mmlu_file: Path) -> dict:
    model, tokenizer = loaded
    timing = {part: {"step": seconds_per_step(model, tokenizer, training),
                     "record": seconds_per_record(model, tokenizer, training)}
              for part, training in (("main", budget.main), ("scaling", budget.scaling))}
    timing["question"] = seconds_per_question(model, tokenizer, mmlu_file)
    return timing


def predicted_seconds(run: RunSpec, budget: Budget, timing: dict, test_records: int) -> float:
    """Training steps, held-out records and MMLU questions of the run, times their measured cost.

    The local baseline evaluates every client's own model, so it evaluates ``clients`` times.
    """
    training: Training = getattr(budget, run.part)
    per_round = training.clients_per_round or run.clients
    if training.local_steps is not None:
        steps = training.rounds * per_round * training.local_steps
    else:  # epochs over the sampled clients' records, about per_round/clients of them
        steps = training.rounds * training.local_epochs * run.records * per_round / run.clients / training.batch_size
    models = run.clients if run.method == "local" else 1
    records = (training.rounds + 1) * min(training.test_limit or test_records, test_records) * models
    questions = (budget.mmlu_questions or 0) * models if run.part == "main" else 0
    part = timing[run.part]
    return steps * part["step"] + records * part["record"] + questions * timing["question"]


# --- running ----------------------------------------------------------------------------------


@dataclass
class RunResult:
    run: RunSpec
    rows: list[dict]
    communication: dict
    seconds: float

    def losses(self) -> list[float]:
        return [row["eval_loss"] for row in self.rows]

    @property
    def final_loss(self) -> float:
        return self.rows[-1]["eval_loss"]

    @property
    def best_loss(self) -> float:
        """Best over the trained rounds (round 0 is the untrained model, the same for all)."""
        return min(self.losses()[1:])

    @property
    def mmlu(self) -> float | None:
        return self.rows[-1].get("mmlu_acc")


def execute(runs: list[RunSpec], loaded: tuple, work: Path) -> list[RunResult]:
    results = []
    for index, run in enumerate(runs, 1):
        started = time.perf_counter()
        rows, summary = run_federation(run.values, work / f"run-{index}", loaded=loaded)
        results.append(RunResult(run, rows, summary["communication"], time.perf_counter() - started))
        progress(f"{index}/{len(runs)} {run.label}: final held-out loss {results[-1].final_loss:.4f} "
                 f"({results[-1].seconds:.0f} s)")
    return results


# --- report -----------------------------------------------------------------------------------


def communication_cell(result: RunResult, key: str) -> str:
    if result.run.method in BASELINES:
        return "— (baseline)"
    return f"{100 * result.communication[key]:.3g} %"


def mmlu_cell(result: RunResult) -> str:
    return "—" if result.mmlu is None else f"{result.mmlu:.3f}"


def setting_table(results: list[RunResult]) -> list[str]:
    flora = next(r for r in results if r.run.method == "flora")
    rows = [[r.run.method, f"{r.final_loss:.4f}", f"{r.best_loss:.4f}", f"{r.final_loss - flora.final_loss:+.4f}",
             mmlu_cell(r), communication_cell(r, "up_vs_full_finetuning"),
             communication_cell(r, "down_vs_full_finetuning"), f"{r.seconds:.0f}"] for r in results]
    return markdown_table(["method", "final loss", "best loss", "final − FLoRA", "MMLU acc",
                           "upload / round vs full FT", "download / round vs full FT", "wall s"], rows)


def flora_verdict(results: list[RunResult]) -> str:
    """Where FLoRA stands on the final held-out loss, said plainly either way."""
    flora = next(r for r in results if r.run.method == "flora")
    better = sorted((r for r in results if r.final_loss < flora.final_loss), key=lambda r: r.final_loss)
    if not better:
        return f"FLoRA has the lowest final held-out loss of the {len(results)} runs."
    names = ", ".join(f"{r.run.method} ({r.final_loss:.4f})" for r in better)
    return (f"**FLoRA does not win here**: {len(better)} of {len(results)} runs end with a lower held-out "
            f"loss than FLoRA's {flora.final_loss:.4f}: {names}.")


def mmlu_noise_note(results: list[RunResult]) -> str:
    scored = [r for r in results if r.mmlu is not None]
    if not scored:
        return ""
    total = scored[0].rows[-1]["mmlu_total"]
    error = 0.5 / math.sqrt(total)  # the binomial standard error at its largest (p = 0.5)
    return (f"MMLU: {total} questions, the same for every run; one standard error is up to {error:.3f}, so "
            f"accuracy differences below ~{2 * error:.2f} are not evidence of a difference.")


def scaling_table(results: list[RunResult]) -> tuple[list[str], list[str]]:
    final = {(r.run.method, r.run.clients): r.final_loss for r in results}
    rows = [[method, *(f"{final[method, clients]:.4f}" for clients in SCALING_CLIENTS)]
            for method in SCALING_METHODS]
    verdicts = []
    for clients in SCALING_CLIENTS:
        ranked = sorted(SCALING_METHODS, key=lambda m: final[m, clients])
        verdicts.append(f"{clients} clients: lowest final held-out loss {ranked[0]} "
                        f"({final[ranked[0], clients]:.4f}), then "
                        + ", ".join(f"{m} ({final[m, clients]:.4f})" for m in ranked[1:]) + ".")
    return markdown_table(["method", *(f"{n} clients" for n in SCALING_CLIENTS)], rows), verdicts


def budget_table(budget: Budget) -> list[str]:
    def row(title: str, training: Training, mmlu: str) -> list[str]:
        per_client = (f"{training.local_steps} step{'s' * (training.local_steps > 1)}"
                      if training.local_steps is not None else f"{training.local_epochs:g} epoch")
        return [title, training.rounds, training.clients_per_round or "all", per_client, training.batch_size,
                training.max_length, training.test_limit or "all", mmlu]
    return markdown_table(["part", "rounds", "clients / round", "local work", "batch", "max_length",
                           "held-out records", "MMLU questions"],
                          [row("Dolly settings (9 clients)", budget.main, str(budget.mmlu_questions or "all")),
                           row(f"RoLoRA scaling ({', '.join(map(str, SCALING_CLIENTS))} clients)", budget.scaling,
                               "—")])


def timing_lines(timing: dict, budget: Budget, results: list[RunResult], predicted: float,
                 measured: float) -> list[str]:
    main, scaling = timing["main"], timing["scaling"]
    runs = sum(r.seconds for r in results)
    return [f"Calibration, measured before training: a training step takes {main['step']:.2f} s (batch "
            f"{budget.main.batch_size}, max_length {budget.main.max_length}) and {scaling['step']:.2f} s (batch "
            f"{budget.scaling.batch_size}, max_length {budget.scaling.max_length}); the held-out loss "
            f"{main['record']:.3f} s and {scaling['record']:.3f} s per record; MMLU {timing['question']:.3f} s "
            f"per question. Predicted training and evaluation time {predicted / 60:.1f} min; the {len(results)} "
            f"runs took {runs / 60:.1f} min (data loading and checkpoints included); **measured total "
            f"{measured / 60:.1f} min** (model loading and calibration included)."]


def report(budget: Budget, command: str, results: list[RunResult], timing: dict, predicted: float,
           measured: float, load: float) -> str:
    lines = ["# Quality benchmark", "", environment_line(torch.get_num_threads(), load), "",
             f"Command: `{command}` (budget `{budget.name}`). Model {budget.model}, loaded once. Seed {SEED} for "
             "every run (client sampling, LoRA init, batch order), for the MMLU subset and for the Dirichlet "
             "splits. Held-out loss: the first records of Dolly's `global_test.json`; MMLU: final round only, "
             "a fixed seeded subset of `mmlu_test_1444.json`. Communication: per round, as a fraction of full "
             "fine-tuning (every participating client sending / receiving all model parameters). 'best loss' "
             "is the best over the trained rounds. Generated by `benchmarks/quality.py`.", "",
             "## Budget", "", *budget_table(budget), "",
             *timing_lines(timing, budget, results, predicted, measured), ""]
    for setting in SETTINGS:
        chosen = [r for r in results if r.run.setting == setting.key]
        lines += [f"## {setting.title}", "",
                  f"Untrained model (round 0): held-out loss {chosen[0].losses()[0]:.4f}.", "",
                  *setting_table(chosen), "", flora_verdict(chosen), "", mmlu_noise_note(chosen), ""]
    table, verdicts = scaling_table([r for r in results if r.run.setting == "scaling"])
    lines += ["## RoLoRA scaling", "",
              f"The {len(dolly_client_files())} Dolly client files pooled and re-split by Dirichlet "
              f"(α = {DIRICHLET_ALPHA}) over category; rank {SCALING_RANK}; every client in every round. "
              "Final held-out loss:", "", *table, "", *(f"- {v}" for v in verdicts), "",
              "![held-out loss per round](quality.png)", ""]
    return "\n".join(lines)


def plot(results: list[RunResult], path: Path) -> None:
    """Held-out loss per round, one panel per Dolly setting; final loss against clients for scaling."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, len(SETTINGS) + 1)
    for ax, setting in zip(axes, SETTINGS):
        for result in (r for r in results if r.run.setting == setting.key):
            ax.plot(range(len(result.rows)), result.losses(), marker="o", markersize=3, label=result.run.method)
        ax.set(title=setting.title, xlabel="round", ylabel="held-out loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    scaling_ax = axes[-1]
    for method in SCALING_METHODS:
        chosen = [r for r in results if r.run.setting == "scaling" and r.run.method == method]
        scaling_ax.plot([r.run.clients for r in chosen], [r.final_loss for r in chosen], marker="o", label=method)
    scaling_ax.set(title=f"RoLoRA scaling, rank {SCALING_RANK}", xlabel="clients", ylabel="final held-out loss",
                   xticks=list(SCALING_CLIENTS))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


# --- main -------------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)


def dry_run(budget: Budget, runs: list[RunSpec]) -> None:
    print(f"budget {budget.name}, model {budget.model}")
    print("\n".join(budget_table(budget)))
    for run in runs:
        print(f"- {run.label}: ranks {run.values['ranks']}")
    print(f"{len(runs)} runs, every configuration valid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--quick", action="store_true", help="a tiny budget: smoke-test the script in minutes")
    choice.add_argument("--short", action="store_true", help="about half an hour on 2 CPU cores")
    choice.add_argument("--scale", action="store_true", help="the paper's settings (TinyLlama-1.1B, GPU)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print every run's config, run nothing")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = BUDGETS["quick" if args.quick else "short" if args.short else "scale" if args.scale else "hour"]
    require_shared_data()
    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fedlora-quality-") as folder:
        work = Path(folder)
        mmlu_file = write_mmlu_subset(work / "mmlu_subset.json", budget.mmlu_questions)
        runs = plan_runs(budget, mmlu_file, pool_dolly(work / "dolly_pooled.json"))
        check_plan(runs)
        if args.dry_run:
            dry_run(budget, runs)
            return
        from fedlora.models import ModelError, load_model

        try:
            loaded = load_model(budget.model, seed=SEED)
        except ModelError as error:  # e.g. --scale without network access to the Hub
            sys.exit(str(error))
        progress("calibrating: one training step and one evaluation")
        timing = calibrate(loaded, budget, mmlu_file)
        test_records = len(json.loads(DOLLY_TEST.read_text()))
        predicted = sum(predicted_seconds(run, budget, timing, test_records) for run in runs)
        progress(f"{len(runs)} runs, predicted {predicted / 60:.1f} min of training and evaluation")
        results = execute(runs, loaded, work)
    command = "python " + shlex.join(sys.argv)
    text = report(budget, command, results, timing, predicted, time.perf_counter() - started, load)
    plot(results, RESULTS / "quality.png")
    write_result("quality.md", text)
    print(text)


if __name__ == "__main__":
    main()
