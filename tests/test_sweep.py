"""`fedlora sweep` on tiny-llama: run folders, one shared model restored exactly, resume after a
kill, added methods and seeds, refusal of a changed configuration, the final MMLU, the CLI."""

from __future__ import annotations

import collections
import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedlora import cli
from fedlora.aggregation import aggregator_class, available_aggregators
from fedlora.engine.config import ConfigError, build_config, save_config
from fedlora.engine.evaluator import Evaluator
from fedlora.engine.setup import prepare_run
from fedlora.engine.metrics import read_metrics
from fedlora.runtime.inprocess import run_inprocess
from fedlora.runtime.observer import RunObserver
from fedlora.sweep import SweepObserver, load_sweep, run_sweep
from fedlora.sweep.compare import build_comparison, comparison_markdown
from fedlora.sweep.plan import plan_sweep
from fedlora.sweep.progress import remaining_seconds

RUN = {"model": "tiny-llama", "rounds": 2, "local_steps": 1, "batch_size": 2, "max_length": 32, "lr": 1e-2,
       "validation_fraction": 0.1, "mmlu_limit": 0}
METRIC_KEYS = ("round", "eval_loss", "val_loss", "train_loss", "bytes_up", "bytes_down", "clients")


def document(client_dir: Path, *, methods=("flora",), seeds=(0, 1), lrs=(1e-2,), ranks=(4, 2, 1), **run) -> dict:
    doc = {"run": {**RUN, "data": str(client_dir), **run}, "grid": {"seed": list(seeds)},
           "settings": {"het": {"ranks": list(ranks), "methods": list(methods)}}}
    if len(lrs) > 1:
        doc["grid"]["lr"] = list(lrs)
        doc["tune"] = {"keys": ["lr"]}
    return doc


def plan_of(doc: dict):
    return plan_sweep(copy.deepcopy(doc), "sweep.toml")


def deterministic(comparison: dict) -> dict:
    """A comparison without what names the folder, the date or the measured times."""
    return {key: value for key, value in comparison.items() if key not in ("sweep", "generated", "measured")}


def rows_of(run_dir: Path) -> list[dict]:
    return [{key: row.get(key) for key in METRIC_KEYS} for row in read_metrics(run_dir)]


def test_every_combination_is_an_ordinary_run_folder_and_the_shared_model_is_restored_exactly(client_dir, tmp_path):
    # fedit runs after flora merged into the shared model's base weights: it must see the loaded ones
    plan = plan_of(document(client_dir, methods=("flora", "fedit"), seeds=(0,), ranks=(2,)))
    result = run_sweep(plan, tmp_path / "sweep")
    assert result.ran == ["het/flora/seed=0", "het/fedit/seed=0"]
    run_dir = tmp_path / "sweep" / "het" / "fedit" / "seed=0"
    for name in ("config.json", "metrics.jsonl", "summary.json", "report.md", "curves.png", "checkpoints"):
        assert (run_dir / name).exists(), name

    alone = standalone(client_dir, tmp_path / "alone", ranks=[2], method="fedit", seed=0)
    assert rows_of(run_dir) == rows_of(alone)
    assert rows_of(run_dir)[-1]["val_loss"] is not None  # where tuning reads it


def standalone(client_dir: Path, out: Path, **values) -> Path:
    out.mkdir()
    config = build_config({**RUN, "data": str(client_dir), "out": str(out), **values})
    save_config(config, out / "config.json")
    run_inprocess(prepare_run(config, out, log=lambda message: None))
    return out


def test_each_distinct_model_is_evaluated_once_with_the_results_of_evaluating_it_again(client_dir, tmp_path,
                                                                                      monkeypatch):
    calls = []
    measure = Evaluator.measure
    monkeypatch.setattr(Evaluator, "measure", lambda self, model, due: calls.extend(due) or measure(self, model, due))
    plan = plan_of(document(client_dir, methods=("local", "fedit"), seeds=(0,), ranks=(2,), clients_per_round=1))
    run_sweep(plan, tmp_path / "sweep")
    # local scores 3 client models a round: in round 0 the same untrained one, in each later round
    # only the sampled client's is new: the test loss of 3 models; the validation loss (round 2
    # only) of the 3 models there. fedit's round 0 is that untrained model again, and its round 1
    # (one client's adapter, averaged alone) is local's round-1 model, bit for bit: its round 2 is new
    assert collections.Counter(calls) == {"test": 3 + 1, "validation": 3 + 1}
    monkeypatch.setattr(Evaluator, "measure", measure)
    alone = standalone(client_dir, tmp_path / "alone", ranks=[2], method="local", seed=0, clients_per_round=1)
    assert rows_of(tmp_path / "sweep" / "het" / "local" / "seed=0") == rows_of(alone)


class Killed(Exception):
    pass


class KillAfterRound(SweepObserver):
    """Raises from the engine's round callback, as a kill would stop the process: after the
    round's checkpoint and metrics row are written."""

    def __init__(self, folder: str, server_round: int):
        self.folder, self.server_round = folder, server_round

    def run_started(self, run, resumed):
        target = self.server_round if run.folder == self.folder else None

        class Observer(RunObserver):
            def round_finished(self, row):
                if row.round == target:
                    raise Killed(run.folder)
        return Observer()


def test_a_sweep_killed_mid_run_finishes_with_the_uninterrupted_comparison(client_dir, tmp_path):
    plan = plan_of(document(client_dir, methods=("flora", "fedit"), ranks=(2,), lrs=(1e-2, 3e-2)))
    run_sweep(plan, tmp_path / "whole")
    whole = build_comparison(tmp_path / "whole")

    victim = "het/fedit/lr=0.01,seed=0"
    with pytest.raises(Killed):
        run_sweep(plan, tmp_path / "killed", KillAfterRound(victim, 1))
    killed_dir = tmp_path / "killed" / victim
    assert [row["round"] for row in read_metrics(killed_dir)] == [0, 1] and not (killed_dir / "summary.json").exists()

    result = run_sweep(plan, tmp_path / "killed")
    folders = [run.folder for run in plan.runs]
    assert result.resumed == [victim]
    assert result.skipped == folders[:folders.index(victim)]
    assert result.ran == folders[folders.index(victim) + 1:]
    assert rows_of(killed_dir) == rows_of(tmp_path / "whole" / victim)
    assert deterministic(build_comparison(tmp_path / "killed")) == deterministic(whole)


def test_methods_seeds_and_values_added_to_a_finished_sweep_run_only_their_own_runs(client_dir, tmp_path):
    out = tmp_path / "sweep"
    first = run_sweep(plan_of(document(client_dir, seeds=(0,))), out)
    assert first.ran == ["het/flora/seed=0"]
    written = (out / "het/flora/seed=0/metrics.jsonl").stat().st_mtime_ns

    added = run_sweep(plan_of(document(client_dir, methods=("flora", "zeropad"), seeds=(0, 1))), out)
    assert added.skipped == ["het/flora/seed=0"]
    assert added.ran == ["het/flora/seed=1", "het/zeropad/seed=0", "het/zeropad/seed=1"]
    assert (out / "het/flora/seed=0/metrics.jsonl").stat().st_mtime_ns == written
    assert set(build_comparison(out)["settings"]["het"]["methods"]) == {"flora", "zeropad"}


@pytest.mark.parametrize("change, named", [
    ({"rounds": 3}, ["'rounds' was 2", "now gives 3"]),
    ({"local_steps": 2}, ["'local_steps' was 1", "now gives 2"]),
    ({"ranks": (4, 4, 4)}, ["'ranks' was [4, 2, 1]", "now gives [4, 4, 4]"]),
])
def test_a_changed_shared_configuration_is_refused_naming_the_difference(client_dir, tmp_path, change, named):
    out = tmp_path / "sweep"
    run_sweep(plan_of(document(client_dir, seeds=(0,))), out)
    with pytest.raises(ConfigError) as refused:
        run_sweep(plan_of(document(client_dir, seeds=(0,), **change)), out)
    message = str(refused.value)
    assert "sweep.toml" in message and "het/flora/seed=0" in message and "another --out" in message
    for part in named:
        assert part in message
    # and nothing ran: the finished run is untouched and no other was started
    assert [path.name for path in (out / "het" / "flora").iterdir()] == ["seed=0"]


def test_a_new_grid_axis_is_refused(client_dir, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(plan_of(document(client_dir, seeds=(0,))), out)
    doc = document(client_dir, seeds=(0,))
    doc["grid"]["local_steps"] = [1, 2]
    with pytest.raises(ConfigError, match=r"grid axes are \['local_steps', 'seed'\] .* has \['seed'\]"):
        run_sweep(plan_of(doc), out)


def test_the_final_mmlu_scores_only_the_chosen_runs(client_dir, tmp_path):
    mmlu = tmp_path / "mmlu.json"
    mmlu.write_text(json.dumps([{"input": f"Qusetion: What is {i} + 1? Options: A. {i}, B. {i + 1}, C. 0, D. 7",
                                 "output": f"The answer is: B. {i + 1}", "class": "arithmetic"} for i in range(6)]))
    # FedSA-LoRA's clients keep their B: the final MMLU completes each client's model from its store
    doc = document(client_dir, methods=("flora", "fedsa"), ranks=(2,), lrs=(1e-3, 3e-2))
    doc["final"] = {"mmlu": str(mmlu), "mmlu_questions": 4}
    out = tmp_path / "sweep"
    result = run_sweep(plan_of(doc), out)
    comparison = build_comparison(out)
    entry = comparison["settings"]["het"]["methods"]["flora"]
    fedsa = comparison["settings"]["het"]["methods"]["fedsa"]
    assert sorted(result.scored) == sorted(entry["runs"] + fedsa["runs"]) and len(result.scored) == 4
    assert fedsa["mmlu"]["questions"] == 4
    for run in result.scored:
        scored = json.loads((out / run / "final-mmlu.json").read_text())
        assert scored["mmlu_total"] == 4 and scored["questions"] == 4 and scored["round"] == 2
    assert entry["mmlu"]["questions"] == 4 and entry["mmlu"]["runs"] == 2
    low, high = entry["mmlu"]["ci95"]
    assert low <= entry["mmlu"]["acc"] <= high
    # scored once: a second invocation finds every run and every score done
    again = run_sweep(plan_of(doc), out)
    assert again.ran == [] and again.scored == []
    # scoring fewer seeds keeps the scores made; other questions are scored anew, for those seeds only
    doc["final"] = {"mmlu": str(mmlu), "mmlu_questions": 3, "seeds": [1]}
    fewer = run_sweep(plan_of(doc), out)
    assert fewer.scored == [run for run in entry["runs"] + fedsa["runs"] if run.endswith("seed=1")]
    # the comparison counts only scores made on the questions the file now names
    assert build_comparison(out)["settings"]["het"]["methods"]["flora"]["mmlu"] | {"acc": 0, "ci95": 0} == {
        "acc": 0, "ci95": 0, "questions": 3, "runs": 1}


def test_a_test_set_scored_on_the_chosen_runs_only_gives_the_comparison_of_scoring_every_run(client_dir, tmp_path):
    """[tune] test = "chosen": the runs score the test set on round 0 alone; once a group is tuned,
    its chosen runs' final models (the local baseline's every client's) are scored after the run,
    to the same numbers, and the runs tuning passed over have no final test loss at all."""
    # both score the test set at the ends (eval_every = rounds): rounds 0 and 2
    doc = document(client_dir, methods=("flora", "local"), ranks=(2,), lrs=(1e-3, 3e-2), eval_every=2)
    run_sweep(plan_of(doc), tmp_path / "every")
    doc["tune"]["test"] = "chosen"
    out = tmp_path / "chosen"
    result = run_sweep(plan_of(doc), out)
    comparison = build_comparison(out)
    assert deterministic(comparison) == deterministic(build_comparison(tmp_path / "every"))
    chosen = [run for entry in comparison["settings"]["het"]["methods"].values() for run in entry["runs"]]
    assert sorted(result.scored) == sorted(chosen) and len(chosen) == 4
    for run in (run.folder for run in plan_of(doc).runs):
        last = read_metrics(out / run)[-1]
        assert "eval_loss" not in last and "val_loss" in last  # tuning's data, every round
        assert (out / run / "final-test.json").is_file() == (run in chosen)
    assert json.loads((out / chosen[0] / "final-test.json").read_text())["round"] == 2
    again = run_sweep(plan_of(doc), out)  # scored once
    assert again.ran == [] and again.scored == []


def test_tuning_reads_its_seeds_and_the_other_seeds_run_at_the_choice_only(client_dir, tmp_path):
    """[tune] seeds: the runs of the other seeds are run once their group is tuned, at its
    chosen values; [method_grid]: a method tunes over values of its own; val_every = 0: the
    validation loss only where tuning reads it, the final round."""
    doc = document(client_dir, methods=("flora", "fedit"), seeds=(0, 1, 2), ranks=(2,), lrs=(1e-3, 3e-2),
                   val_every=0)
    doc["tune"]["seeds"] = [0]
    doc["method_grid"] = {"fedit": {"lr": [1e-2, 2e-2, 3e-2]}}
    plan = plan_of(doc)
    assert len(plan.runs) == 2 * 3 + 3 * 3
    out = tmp_path / "sweep"
    result = run_sweep(plan, out)
    comparison = build_comparison(out)
    assert comparison["measured"] == {**comparison["measured"], "runs": 2 + 2 + 3 + 2, "planned": 9}
    for method, grid in (("flora", [1e-3, 3e-2]), ("fedit", [1e-2, 2e-2, 3e-2])):
        entry = comparison["settings"]["het"]["methods"][method]
        assert [c["values"]["lr"] for c in entry["tuning"]] == grid and all(c["seeds"] == 1 for c in entry["tuning"])
        seed0 = {c["values"]["lr"]: c["val_loss"]["mean"] for c in entry["tuning"]}
        assert entry["chosen"]["lr"] == min(seed0, key=seed0.get)
        chosen = [f"het/{method}/lr={entry['chosen']['lr']!r},seed={seed}" for seed in (0, 1, 2)]
        assert entry["runs"] == chosen and entry["seeds"] == 3
        ran = [folder for folder in result.ran if folder.startswith(f"het/{method}/")]
        assert ran == [f"het/{method}/lr={lr!r},seed=0" for lr in grid] + chosen[1:]
        for folder in ran:
            rows = read_metrics(out / folder)
            assert [row["round"] for row in rows if "val_loss" in row] == [2]
    markdown = comparison_markdown(comparison)
    # the tuning table's columns: both grids' values in ascending order, not in the order met
    assert "| method | lr=0.001 | lr=0.01 | lr=0.02 | lr=0.03 |" in markdown
    described = " ".join(markdown.split())
    assert "over seeds 0 (the other seeds run at the chosen values only)" in described
    assert "(fedit: lr ∈ {0.01, 0.02, 0.03} instead)" in described
    # nothing left to run, and the comparison stands as it was
    again = run_sweep(plan, out)
    assert again.ran == [] and len(again.skipped) == 9


def test_the_eta_costs_each_pending_run_by_its_method():
    done = [("flora", 10.0), ("flora", 20.0), ("local", 90.0)]
    # flora 15 s each, local 90 s, a method not seen yet the mean of all (40 s)
    assert remaining_seconds(done, ["flora", "local", "fedit"]) == pytest.approx(15 + 90 + 40)
    assert remaining_seconds([], ["flora"]) is None


@pytest.mark.parametrize("doc_change, expected", [
    (lambda d: d["run"].update(out="x"), "'out' is chosen by the sweep"),
    (lambda d: d.update(grids={}), "'grids' is not a sweep section"),
    (lambda d: d["grid"].update(method=["fedit"]), "'method' cannot be an axis"),
    (lambda d: d["grid"].update(seed=[]), "'seed' must be a non-empty list"),
    (lambda d: d["grid"].update(seed=[0, 0]), "lists 0 twice"),
    (lambda d: d.update(tune={"keys": ["seed"]}), "must be a grid axis other than seed"),
    (lambda d: d["settings"]["het"].update(methods=[]), "settings.het.methods must be a non-empty list"),
    (lambda d: d["settings"]["het"].update(seed=3), "settings.het.seed is also a grid axis"),
    (lambda d: d["settings"]["het"].update(methods=["fedit"]), "'ranks' are mixed"),
    (lambda d: d["run"].update(validation_fraction=0.0) or d.update(tune={"keys": ["lr"]})
     or d["grid"].update(lr=[1e-3, 1e-2]), "'validation_fraction' 0, but tuning needs val_loss"),
    (lambda d: d.update(compare={"reference": "fedavg"}), "must be a method of some setting"),
    (lambda d: d.update(tune={"keys": [], "test": "chosen"}), "no keys are tuned: every run is chosen"),
    (lambda d: d["grid"].update(lr=[1e-3, 1e-2]) or d.update(tune={"keys": ["lr"], "test": "best"}),
     "[tune] 'test' must be \"all\""),
    (lambda d: d["run"].update(runtime="flower"), "a sweep shares one loaded model"),
])
def test_sweep_file_mistakes_are_named_before_anything_runs(client_dir, doc_change, expected):
    doc = document(client_dir)
    doc_change(doc)
    with pytest.raises(ConfigError, match="sweep.toml") as refused:
        plan_of(doc)
    assert expected in str(refused.value)


def test_sweep_then_compare_from_the_command_line(client_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.toml").write_text(f'model = "tiny-llama"\ndata = "{client_dir}"\nbatch_size = 2\n')
    (tmp_path / "sweep.toml").write_text("""
base = "base.toml"
[run]
rounds = 2
local_steps = 1
max_length = 32
validation_fraction = 0.1
mmlu_limit = 0
[grid]
seed = [0, 1]
lr = [1e-3, 3e-2]
[tune]
keys = ["lr"]
[settings.homogeneous]
ranks = [2]
methods = ["flora", "fedit"]
[compare]
reference = "fedit"
""")
    runner = CliRunner()
    dry = runner.invoke(cli.app, ["sweep", "sweep.toml", "--out", "out", "--dry-run"], catch_exceptions=False)
    assert dry.exit_code == 0 and "8 runs, 0 finished" in dry.output and not (tmp_path / "out").exists()
    done = runner.invoke(cli.app, ["sweep", "sweep.toml", "--out", "out"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert "8 runs ran" in done.output and "comparison.md" in done.output

    compared = runner.invoke(cli.app, ["compare", "out", "--reference", "flora"], catch_exceptions=False)
    assert compared.exit_code == 0, compared.output
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    setting = comparison["settings"]["homogeneous"]
    assert setting["reference"] == "flora"
    for method, entry in setting["methods"].items():
        assert set(entry) >= {"chosen", "seeds", "test_loss", "vs_reference", "runs"}
        assert entry["seeds"] == 2 and set(entry["chosen"]) == {"lr"} and len(entry["runs"]) == 2
        assert len(entry["test_loss"]["ci95"]) == 2
    assert setting["methods"]["flora"]["vs_reference"] is None
    assert set(setting["methods"]["fedit"]["vs_reference"]) >= {"mean", "ci95", "significant"}
    markdown = (tmp_path / "out" / "comparison.md").read_text()
    assert "## homogeneous" in markdown and "Not significantly different from flora" in markdown
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 0

    # each combination is an ordinary run folder: report and eval work on it
    run_dir = tmp_path / "out" / setting["methods"]["fedit"]["runs"][0]
    assert runner.invoke(cli.app, ["report", str(run_dir)], catch_exceptions=False).exit_code == 0
    evaluated = runner.invoke(cli.app, ["eval", str(run_dir), "--test-data", str(client_dir / "global_test.json")],
                              catch_exceptions=False)
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["eval_loss"] == pytest.approx(
        setting["methods"]["fedit"]["test_loss_by_seed"]["0"], rel=1e-6)

    (tmp_path / "sweep.toml").write_text((tmp_path / "sweep.toml").read_text().replace("rounds = 2", "rounds = 3"))
    refused = runner.invoke(cli.app, ["sweep", "sweep.toml", "--out", "out"], catch_exceptions=False)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "'rounds' was 2" in " ".join(refused.output.split())


@pytest.mark.parametrize("name", ["quality", "rolora_scaling", "headline", "drift", "horizon"])
def test_the_benchmark_sweep_files_are_valid(name, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    if not (root.parent / "shared" / "data" / "mmlu").is_dir():
        pytest.skip("the shared data (MMLU for [final]) is not here")
    monkeypatch.chdir(root)  # the files' paths are relative to the repository root, as `make` runs them
    plan = load_sweep(root / "benchmarks" / f"{name}.toml")
    assert len(plan.grid["seed"]) >= 3
    assert all(run.config.mmlu_limit == 0 for run in plan.runs)  # no MMLU inside the runs
    if name in ("headline", "drift"):  # tuning reads ≥ 100 validation records, scored where it reads them
        from fedlora.data import split_clients
        from fedlora.engine.inputs import load_client_records, resolve_data_paths
        config = resolve_data_paths(plan.runs[0].config, log=lambda message: None)
        assert len(split_clients(load_client_records(config), config.validation_fraction, 0)[1]) >= 100
        assert {run.config.val_every for run in plan.runs} == {0} and plan.tuning.keys == ("lr",)
    if name == "headline":  # ≥ 10 seeds at quality.toml's budget; centralized tuned below 1e-3 too
        assert len(plan.grid["seed"]) >= 10 and len(plan.grid["lr"]) >= 3
        assert {(r.config.rounds, r.config.local_steps, r.config.clients_per_round) for r in plan.runs} == {(2, 3, 2)}
        assert min(plan.tuning.grid_of("centralized")["lr"]) < 1e-3
        assert set(plan.settings["homogeneous"]) >= {"flora", "fedit", "ffa", "flora-warm"}
        assert set(plan.settings["heterogeneous"]) >= {"flora", "zeropad", "flexlora", "flora-warm"}
    if name == "drift":  # ≥ 30 local steps and one level between, ≥ 4 rounds, ≥ 5 seeds, ≥ 2 rates
        steps = plan.grid["local_steps"]
        assert max(steps) >= 30 and any(3 < s < 30 for s in steps) and len(plan.grid["seed"]) >= 5
        assert len(plan.grid["lr"]) >= 2 and {run.config.rounds for run in plan.runs} == {4}
    if name == "horizon":  # ≥ 30 rounds of ≥ 5 steps, ≥ 3 seeds, a test loss to draw every few rounds
        assert {(run.config.rounds, run.config.local_steps) for run in plan.runs} == {(30, 5)}
        assert len(plan.grid["seed"]) >= 3 and {run.config.eval_every for run in plan.runs} == {3}
        assert set(plan.settings["homogeneous"]) == {"flora", "fedit", "ffa", "flora-warm"}
    if name == "quality":
        assert len(plan.grid["lr"]) >= 3 and plan.tuning.keys == ("lr",) and plan.final.questions >= 300
        assert {run.config.test_limit for run in plan.runs} == {None}  # the whole test set
        # every method and baseline; those that mix ranks in the heterogeneous setting too; raflora
        # and fedplora there only, as at one rank they are flexlora (test_aggregation_2026.py) and
        # fedit (test_methods_2026c.py), and flora-adalora, as FLoRA's appendix; fedmomentum
        # nowhere, as it takes one rank and there is flora-warm (test_methods_2026b.py)
        methods = set(available_aggregators())
        assert set(plan.settings["homogeneous"]) == methods - {"raflora", "fedplora", "flora-adalora", "fedmomentum"}
        assert set(plan.settings["heterogeneous"]) == {name for name in methods
                                                       if aggregator_class(name).heterogeneous_ranks}
