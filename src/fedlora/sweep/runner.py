"""Running a sweep: every planned run as an ordinary run folder, resumably, on one loaded model.

The model is loaded once (once per seed for tiny-llama, whose weights the seed draws) and
shared by the runs; the base weights a run merges into are restored bit-exactly before the
next. Run again on the same folder, a sweep skips finished runs and resumes an unfinished
one from its checkpoint, the way ``fedlora run --resume`` does; a run already on disk whose
configuration differs from the sweep file's is refused, naming the keys that differ.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from fedlora.api import execute
from fedlora.data import load_mmlu, split_clients
from fedlora.engine.config import CONFIG_FILE, ConfigError, RunConfig, check_client_count, load_saved_config, \
    save_config
from fedlora.engine.evaluator import Evaluator
from fedlora.engine.global_model import GlobalModel
from fedlora.engine.inputs import check_model_fits, load_client_records, load_run_model, resolve_data_paths
from fedlora.engine.setup import prepare_run
from fedlora.files import atomic_write_text, folder_lock
from fedlora.lora.merge import base_weight
from fedlora.models import weights_depend_on_seed
from fedlora.sweep.outcomes import FINAL_MMLU_FILE, FINAL_TEST_FILE, RunOutcome, is_finished, read_final_mmlu, \
    read_final_test
from fedlora.sweep.plan import SEED, PlannedRun, SweepPlan
from fedlora.sweep.progress import SweepObserver
from fedlora.sweep.tuning import Choice, choose, groups
from fedlora.trackers import TrackerGroup

PLAN_FILE = "sweep.json"


@dataclass
class SweepResult:
    ran: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    scored: list[str] = field(default_factory=list)  # runs given a final test loss or MMLU now


def with_out(run: PlannedRun, out_dir: Path) -> RunConfig:
    return run.config.replace(out=str(out_dir / run.folder))


def run_sweep(plan: SweepPlan, out_dir: str | Path, observer: SweepObserver | None = None) -> SweepResult:
    """Run (or continue) every planned run, then score the final MMLU of the chosen ones; one
    sweep at a time in ``out_dir`` (:func:`fedlora.files.folder_lock`)."""
    out_dir = Path(out_dir)
    observer = observer or SweepObserver()
    check_unchanged(plan, out_dir)
    preflight(plan)
    out_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(out_dir):
        return _run_planned(plan, out_dir, observer)


def _run_planned(plan: SweepPlan, out_dir: Path, observer: SweepObserver) -> SweepResult:
    atomic_write_text(out_dir / PLAN_FILE, json.dumps(plan.to_json(), indent=2) + "\n")
    result = SweepResult()
    models = ModelCache()
    evaluations = ExactEvaluations()
    grouped = groups(plan.runs, plan.tuning.keys)
    finished = {run.folder for run in plan.runs if is_finished(out_dir / run.folder)}
    result.skipped = [run.folder for run in plan.runs if run.folder in finished]
    pending = [method for runs in grouped.values() for method in _to_run(plan, runs, finished)]
    observer.sweep_started(len(finished) + len(pending), pending)

    def run_each(runs: list[PlannedRun]) -> None:
        for run in runs:
            if run.folder not in finished:
                resumed = _execute(run, plan, out_dir, models, evaluations, observer)
                (result.resumed if resumed else result.ran).append(run.folder)
                finished.add(run.folder)

    for runs in grouped.values():
        run_each([run for run in runs if plan.tuning.tunes_on(run)])
        # the runs tuning reads are done: the choice is known, and the other seeds run at it
        chosen = _choice(plan, runs, out_dir).runs
        run_each(chosen)
        result.scored += _score_chosen(plan, chosen, out_dir, models, evaluations, observer)
    return result


def _to_run(plan: SweepPlan, runs: list[PlannedRun], finished: set[str]) -> list[str]:
    """The method of each run of one group that is still to run: the unfinished runs tuning
    reads, and one per other seed none of whose runs has finished."""
    tuning = [run for run in runs if plan.tuning.tunes_on(run)]
    done_seeds = {run.point.get(SEED) for run in runs if run.folder in finished}
    other_seeds = {run.point.get(SEED) for run in runs if run not in tuning} - done_seeds
    return [run.method for run in tuning if run.folder not in finished] + [runs[0].method] * len(other_seeds)


def _choice(plan: SweepPlan, runs: list[PlannedRun], out_dir: Path) -> Choice:
    """The group's choice, from the final validation loss of the runs tuning reads."""
    val_losses = {run.folder: RunOutcome.read(out_dir / run.folder).final_val_loss
                  for run in runs if plan.tuning.tunes_on(run)}
    return choose(runs, val_losses, plan.tuning)


# -- refusing a changed sweep -------------------------------------------------------------------

def check_unchanged(plan: SweepPlan, out_dir: Path) -> None:
    """Refuse a sweep file whose shared configuration differs from the runs already in ``out_dir``."""
    previous = out_dir / PLAN_FILE
    if previous.is_file():
        axes = list(json.loads(previous.read_text(encoding="utf-8"))["grid"])
        if sorted(axes) != sorted(plan.grid):
            raise ConfigError(f"{plan.source}: grid axes are {sorted(plan.grid)} but the sweep in {out_dir} has "
                              f"{sorted(axes)}; values may be added to an axis, axes not (use another --out)")
    for run in plan.runs:
        saved_file = out_dir / run.folder / CONFIG_FILE
        if not saved_file.is_file():
            continue
        saved, planned = load_saved_config(saved_file).to_dict(), with_out(run, out_dir).to_dict()
        changed = [key for key in planned if key != "out" and saved.get(key) != planned[key]]
        if changed:
            differences = "; ".join(f"{key!r} was {saved.get(key)!r}, the file now gives {planned[key]!r}"
                                    for key in changed)
            raise ConfigError(f"{plan.source}: {out_dir / run.folder} ran with another configuration: {differences}. "
                              "A sweep's shared configuration cannot change; add methods, seeds or grid values, "
                              "or use another --out")


def preflight(plan: SweepPlan) -> None:
    """The checks that need the data and model shapes (no weights), for every run, before any training."""
    clients: dict[str, int] = {}
    shapes_checked: set[str] = set()
    for run in plan.runs:
        config = resolve_data_paths(run.config, log=lambda message: None)
        if not config.data_on_nodes:
            data_key = json.dumps([config.data, config.clients, config.partition, config.dirichlet_alpha,
                                   config.partition_by, config.min_partition_size, config.seed,
                                   config.validation_fraction])
            if data_key not in clients:
                records, _ = split_clients(load_client_records(config), config.validation_fraction, config.seed)
                clients[data_key] = len(records)
            check_client_count(config, clients[data_key])
        model_key = json.dumps([config.model, config.gguf_file, config.target_modules, config.ranks])
        if model_key not in shapes_checked:
            check_model_fits(config)
            shapes_checked.add(model_key)


# -- one run ---------------------------------------------------------------------------------------

def _execute(run: PlannedRun, plan: SweepPlan, out_dir: Path, models: ModelCache, evaluations: ExactEvaluations,
             observer: SweepObserver) -> bool:
    """Run or resume one run to its end; True when it resumed an interrupted one. Where the plan
    defers the test set the run scores it on round 0 only (:func:`_score_chosen`); its trackers
    log it in the sweep's group."""
    config = with_out(run, out_dir)
    run_dir = Path(config.out)
    resumed = (run_dir / CONFIG_FILE).is_file()
    if not resumed:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG_FILE)  # before any work, so even round 0 can resume
    engine_observer = observer.run_started(run, resumed)
    loaded = models.get(config, observer.log)
    with restored_afterwards(GlobalModel(loaded[0], check_model_fits(config))):
        result = execute(config, run_dir, [engine_observer], loaded=loaded, tracker_group=TrackerGroup(
            Path(plan.source).stem, out_dir), evaluation=lambda evaluator, model: evaluations.wrap(
                replace(evaluator, deferred=plan.test_chosen_only), models.key, model.adapted_modules))
    # this invocation's share of the run (all of it unless it resumed), for the sweep's measured time
    seconds = result.summary["wall_seconds"]
    observer.run_finished(run, RunOutcome.read(run_dir), seconds, resumed)
    return resumed


# -- what only the chosen runs are scored on ---------------------------------------------------------

def _score_chosen(plan: SweepPlan, chosen: list[PlannedRun], out_dir: Path, models: ModelCache,
                  evaluations: ExactEvaluations, observer: SweepObserver) -> list[str]:
    """The ``chosen`` runs of a complete group: the last round's test loss where the plan defers
    it (every seed), the final MMLU where ``[final]`` asks for it (its seeds). Each score is
    written beside the run once; a sweep run again scores only what is missing."""
    if plan.final is None and not plan.test_chosen_only:
        return []
    scored = []
    for run in chosen:
        config, run_dir = with_out(run, out_dir), out_dir / run.folder
        spec = {"round": config.rounds}
        if plan.test_chosen_only and not _already_scored(read_final_test(run_dir), spec):
            scored.append(_write_final(run_dir / FINAL_TEST_FILE, spec, "test loss", run,
                                       config, _test_evaluator, models, evaluations, observer))
        if plan.final is not None and plan.final.scores(run):
            spec = {**plan.final.question_set(), "round": config.rounds}
            if not _already_scored(read_final_mmlu(run_dir), spec):
                questions = plan.final.select(load_mmlu(plan.final.path))
                scored.append(_write_final(run_dir / FINAL_MMLU_FILE, spec, "MMLU", run, config,
                                           _mmlu_evaluator(questions, observer), models, evaluations, observer))
    return list(dict.fromkeys(scored))


def _already_scored(previous: dict | None, spec: dict) -> bool:
    """Whether a score on disk was made as ``spec`` says (the round, the questions)."""
    return previous is not None and all(previous.get(key) == value for key, value in spec.items())


#: what a final score keeps of the evaluation (the local baseline's per-client results are dropped)
FINAL_KEYS = ("eval_loss", "perplexity", "eval_tokens", "mmlu_acc", "mmlu_correct", "mmlu_total", "mmlu_per_subject",
              "rouge_l", "exact_match", "generation_n", "generated_tokens", "sample_generation")


def _write_final(path: Path, spec: dict, what: str, run: PlannedRun, config: RunConfig,
                 make_evaluator: Callable[[Evaluator], Evaluator], models: ModelCache,
                 evaluations: ExactEvaluations, observer: SweepObserver) -> str:
    observer.final_started(run, what)
    started = time.perf_counter()
    metrics = _evaluate_final_model(config, make_evaluator, models, evaluations, observer)
    metrics["seconds"] = time.perf_counter() - started
    atomic_write_text(path, json.dumps({**spec, **metrics}, indent=2) + "\n")
    return run.folder


def _test_evaluator(evaluator: Evaluator) -> Evaluator:
    """The run's own evaluator (its test examples and prompts, batching and packing), scoring the
    test set alone: its loss and the answers generated."""
    return replace(evaluator, validation_examples=(), questions=(), tasks=())


def _mmlu_evaluator(questions: list, observer: SweepObserver) -> Callable[[Evaluator], Evaluator]:
    def make(evaluator: Evaluator) -> Evaluator:
        return Evaluator(evaluator.tokenizer, evaluator.pad_token_id, evaluator.final_round, questions=questions,
                         batch_size=evaluator.batch_size, prompt_format=evaluator.prompt_format,
                         progress=observer.evaluation_progress)
    return make


def _evaluate_final_model(config: RunConfig, make_evaluator: Callable[[Evaluator], Evaluator], models: ModelCache,
                          evaluations: ExactEvaluations, observer: SweepObserver) -> dict:
    """``make_evaluator``'s scores of a finished run's final model (each client's own, averaged,
    for the local baseline), without what the evaluator does not score this round."""
    setup = prepare_run(config, Path(config.out), log=observer.log, loaded=models.get(config, observer.log),
                        evaluation=lambda evaluator, model: evaluations.wrap(
                            make_evaluator(evaluator), models.key, model.adapted_modules))
    federation = setup.federation
    with restored_afterwards(federation.global_model):
        completed = federation.checkpoints.restore()
        metrics = federation.evaluate(completed)
    return {key: value for key, value in metrics.items() if key in FINAL_KEYS}


# -- one model for many runs ---------------------------------------------------------------------------

class ModelCache:
    """The loaded model of the current runs; loaded again only when a run needs other weights."""

    def __init__(self):
        self.key: str | None = None
        self.loaded: tuple[nn.Module, object] | None = None

    @staticmethod
    def key_of(config: RunConfig) -> str:
        seed = config.seed if weights_depend_on_seed(config.model) else None
        return json.dumps([config.model, config.gguf_file, config.device, config.dtype, config.trust_remote_code,
                           seed, config.quantization, config.quantization_compute_dtype, config.double_quantization])

    def get(self, config: RunConfig, log: Callable[[str], None]) -> tuple[nn.Module, object]:
        key = self.key_of(config)
        if key != self.key:
            self.loaded = None  # free the previous model first
            log(f"loading {config.model}")
            self.loaded, self.key = load_run_model(config), key
        return self.loaded


@contextmanager
def restored_afterwards(global_model: GlobalModel) -> Iterator[None]:
    """The block may merge into the shared model's base weights; afterwards they are the loaded ones
    again, bit for bit, whether the block finished or failed."""
    pristine = global_model.adapted_weights()
    try:
        yield
    finally:
        global_model.load_adapted_weights(pristine)


class ExactEvaluations:
    """Makes each measurement of each distinct model once per sweep process.

    Every run scores the untrained model in round 0, and the local baseline scores every
    client's model every round though only the sampled ones changed. A measurement is a pure
    function of the weights and the evaluation data, so it is looked up by its name and a digest
    of both: the adapted modules' weights (the only ones a run changes), the loaded model, the
    examples, questions and prompts. A result is reused only for bit-identical inputs.
    """

    def __init__(self):
        self._results: dict[tuple, dict] = {}

    def wrap(self, evaluator: Evaluator, model_key: str, modules: list[str]) -> Callable[[nn.Module, int], dict]:
        inputs = _evaluator_digest(evaluator)

        def evaluate(model: nn.Module, server_round: int) -> dict:
            weights = _weights_digest(model, modules)
            metrics = {}
            for measurement in evaluator.due(server_round):
                key = (model_key, inputs, measurement, weights)
                if key not in self._results:
                    self._results[key] = evaluator.measure(model, (measurement,))
                metrics.update(copy.deepcopy(self._results[key]))
            return metrics
        return evaluate


def _evaluator_digest(evaluator: Evaluator) -> str:
    examples = [[[e.input_ids, e.labels] for e in evaluator.test_examples],
                [[e.input_ids, e.labels] for e in evaluator.validation_examples]]
    questions = [[q.question, q.choices, q.answer, q.subject] for q in evaluator.questions]
    prompts = [[p.prompt_ids, p.reference] for p in evaluator.generation_prompts]
    text = json.dumps([examples, questions, prompts, list(evaluator.tasks), evaluator.batch_size, evaluator.packed,
                       evaluator.max_new_tokens, evaluator.tasks_limit, evaluator.prompt_format])
    return hashlib.sha256(text.encode()).hexdigest()


def _weights_digest(model: nn.Module, modules: list[str]) -> str:
    digest = hashlib.sha256()
    for name in modules:
        weight = base_weight(model, name).detach().contiguous()
        digest.update(f"{name}:{weight.dtype}:{tuple(weight.shape)}".encode())
        digest.update(weight.cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
