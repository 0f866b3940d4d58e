"""The aggregation contract: a method written outside src/ runs end to end through its hooks,
the engine, runtimes and CLI name no method, frozen factors follow the run's seed, the ClientApp
imports only what a client needs, and no modules import each other."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest
import torch

from fedlora.aggregation import Aggregator, GlobalUpdate, LoraFactors, MethodOptions, MethodState, Regularizer, \
    available_aggregators, example_weights, factors_to_tensors, get_aggregator, tensors_to_factors
from fedlora.aggregation.method import option
from fedlora.aggregation.fedit import FedIT
from fedlora.aggregation.facts import ATTRIBUTES
from fedlora.aggregation.registry import AGGREGATORS, aggregator_class, describe_methods
from fedlora.engine.config import build_config, save_config
from fedlora.engine.metrics import read_metrics
from fedlora.engine.setup import prepare_run
from fedlora.runtime.inprocess import run_inprocess

import support

SRC = Path(__file__).resolve().parents[1] / "src" / "fedlora"
DETERMINISTIC = ("round", "eval_loss", "train_loss", "bytes_up", "bytes_down", "clients")


@dataclass(frozen=True)
class MomentumOptions(MethodOptions):
    beta: float = option(0.9, "the velocity's decay")


class ServerMomentum(FedIT):
    """FedIT with server momentum: the global adapter moves by v ← β·v + (average − adapter).

    Written here, outside src/, through the contract only: its velocity is state kept across
    rounds (returned with the round's update, adopted on commit), so a resumed run equals the
    uninterrupted one only if it is checkpointed.
    """

    name = "momentum"
    Options = MomentumOptions

    def setup(self, context) -> None:
        super().setup(context)
        self.velocity: dict[str, LoraFactors] = {}

    def combine(self, updates, weights=None, *, server_round=None) -> GlobalUpdate:
        average = super().combine(updates, weights, server_round=server_round)
        previous = self.global_update.factors if self.global_update is not None else average.factors
        moved, velocity = {}, {}
        for module, mean in average.factors.items():
            last = previous[module]
            v = self.velocity.get(module, LoraFactors(torch.zeros_like(mean.A), torch.zeros_like(mean.B), mean.scale))
            beta = self.options.beta
            v = velocity[module] = LoraFactors(beta * v.A + (mean.A - last.A), beta * v.B + (mean.B - last.B),
                                               mean.scale)
            moved[module] = LoraFactors(last.A + v.A, last.B + v.B, mean.scale)
        return replace(average, factors=moved, state=velocity)

    def commit(self, server_round, update) -> None:
        super().commit(server_round, update)
        self.velocity = update.state  # state moves only once the round is applied

    def state_dict(self) -> MethodState:
        meta, tensors = super().state_dict()
        return meta, {**tensors, **factors_to_tensors("velocity/", self.velocity)}

    def load_state_dict(self, state: MethodState) -> None:
        super().load_state_dict(state)
        self.velocity = tensors_to_factors("velocity/", state[1])


def a_penalty(factors: dict[str, LoraFactors], *, weight: float) -> torch.Tensor:
    """The out-of-tree method's term in every client's loss: ``weight`` · Σ ‖A‖²."""
    return weight * sum(f.A.square().sum() for f in factors.values())


@dataclass(frozen=True)
class KeptBOptions(MethodOptions):
    weight: float = option(0.5, "weight of Σ‖A‖² in each client's training loss")


class KeptBWithPenalty(Aggregator):
    """Averages A; every client keeps its own B in its store and adds a penalty on A to its loss.

    Written here, outside src/: state on the clients (their B, never sent), evaluated where it
    lives, and a regulariser every client computes from its plan alone.
    """

    name = "kept-b"
    Options = KeptBOptions
    heterogeneous_ranks = False
    kept_on_client = frozenset({"B"})
    personalised = True

    def regularizer(self) -> Regularizer:
        return Regularizer(f"{__name__}:a_penalty", {"weight": self.options.weight})

    def combine(self, updates, weights=None, *, server_round=None) -> GlobalUpdate:
        shares = example_weights(updates, weights)
        factors = {module: LoraFactors(sum(w * u.factors[module].A for w, u in zip(shares, updates)),
                                       torch.zeros_like(updates[0].factors[module].B), updates[0].factors[module].scale)
                   for module in updates[0].factors}
        return GlobalUpdate(factors=factors, merge=False)

    def evaluation_adapters(self):
        return dict.fromkeys(self.context.ranks, self.global_update.factors if self.global_update else None)


@pytest.fixture
def momentum_registered(monkeypatch):
    monkeypatch.setitem(AGGREGATORS, "momentum", f"{__name__}:ServerMomentum")


@pytest.fixture
def kept_b_registered(monkeypatch):
    monkeypatch.setitem(AGGREGATORS, "kept-b", f"{__name__}:KeptBWithPenalty")


def config_for(client_dir: Path, out: Path, **overrides):
    values = {"model": "tiny-llama", "data": str(client_dir), "rounds": 3, "local_steps": 2, "batch_size": 2,
              "max_length": 48, "ranks": [2], "out": str(out), "lr": 1e-2, "clients_per_round": 2}
    return build_config({**values, **overrides})


def run(config, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    run_inprocess(prepare_run(config, out, log=lambda message: None))
    return [{key: row.get(key) for key in DETERMINISTIC} for row in read_metrics(out)]


def test_a_method_defined_outside_src_runs_end_to_end_and_resumes_exactly(client_dir, tmp_path,
                                                                           momentum_registered):
    assert "momentum" in available_aggregators() and "server momentum" in describe_methods()["momentum"].summary
    uninterrupted = run(config_for(client_dir, tmp_path / "full", method="momentum"), tmp_path / "full")
    # two rounds, then the same run resumed to three: the velocity comes back from the checkpoint
    first_two = config_for(client_dir, tmp_path / "resumed", method="momentum", rounds=2)
    run(first_two, tmp_path / "resumed")
    resumed = run(first_two.replace(rounds=3), tmp_path / "resumed")
    assert resumed == uninterrupted and len(uninterrupted) == 4
    # the hooks did something: without momentum the same run ends elsewhere
    fedit = run(config_for(client_dir, tmp_path / "fedit", method="fedit"), tmp_path / "fedit")
    assert fedit[1] == uninterrupted[1]  # round 1: no velocity yet
    assert fedit[3]["eval_loss"] != uninterrupted[3]["eval_loss"]


@pytest.mark.slow
def test_a_method_with_client_state_and_a_regulariser_runs_alike_in_process_and_over_flower(
        client_dir, tmp_path, kept_b_registered, server_identity):
    """One module outside src/, registered by one line: each client's B lives only in its store
    (the run folder's in-process, its node's over Flower) and its model is evaluated there; the
    regulariser travels in the plan as a reference. Both runtimes give the same rows."""
    in_process = run(config_for(client_dir, tmp_path / "inprocess", method="kept-b", rounds=2), tmp_path / "inprocess")
    support.run_on_in_memory_flower(config_for(client_dir, tmp_path / "flower", method="kept-b", rounds=2,
                                               runtime="flower"), tmp_path / "nodes")
    over_flower = [{key: row.get(key) for key in DETERMINISTIC} for row in read_metrics(tmp_path / "flower")]
    assert over_flower == in_process and all(row["eval_loss"] is not None for row in in_process)
    assert (tmp_path / "inprocess" / "client-state").is_dir() and (tmp_path / "nodes").is_dir()
    # the regulariser acted: without it the same run trains to other losses
    unpenalised = run(config_for(client_dir, tmp_path / "plain", method="kept-b", rounds=2,
                                 method_options={"weight": 0.0}), tmp_path / "plain")
    assert unpenalised[1]["train_loss"] != in_process[1]["train_loss"]


def test_the_frozen_factor_shared_in_round_one_follows_the_run_seed(client_dir, tmp_path):
    def round_one_start(seed: int, out: str) -> dict[str, torch.Tensor]:
        config = config_for(client_dir, tmp_path / out, method="ffa", seed=seed)
        federation = prepare_run(config, tmp_path / out, log=lambda message: None).federation
        federation.start()
        tasks = federation.configure_train(1)
        starts = [{module: f.A for module, f in task.plan.start.items()} for task in tasks]
        assert all(all(torch.equal(s[m], starts[0][m]) for m in s) for s in starts)  # one A for all
        return starts[0]

    seed0, again, seed1 = round_one_start(0, "a"), round_one_start(0, "b"), round_one_start(1, "c")
    assert all(torch.equal(seed0[m], again[m]) for m in seed0)
    assert all(not torch.equal(seed0[m], seed1[m]) for m in seed0)


def test_a_resumed_ffa_run_keeps_the_shared_frozen_factor(client_dir, tmp_path):
    uninterrupted = run(config_for(client_dir, tmp_path / "full", method="ffa", seed=3), tmp_path / "full")
    first = config_for(client_dir, tmp_path / "resumed", method="ffa", seed=3, rounds=1)
    run(first, tmp_path / "resumed")
    assert run(first.replace(rounds=3), tmp_path / "resumed") == uninterrupted


def _names_in_code(path: Path) -> set[str]:
    """String literals, identifiers, attributes and imported names of a module (not its prose)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.update({node.name.split(".")[-1], node.name})
    return names


def test_the_engine_the_runtimes_and_the_cli_name_no_method():
    methods = set(AGGREGATORS) | {target.split(":")[1] for target in AGGREGATORS.values()}
    for path in [*sorted((SRC / "engine").glob("*.py")), *sorted((SRC / "runtime").rglob("*.py")), SRC / "cli.py"]:
        assert not methods & _names_in_code(path), path


def test_the_federation_is_the_round_loop_alone():
    """Catch-up, checkpoints, evaluation and personalisation live beside it, given at construction."""
    assert len((SRC / "engine" / "federation.py").read_text().splitlines()) <= 200


def test_the_client_app_imports_neither_the_federation_nor_plotting():
    code = ("import sys, json; import fedlora.runtime.flower.client_app, fedlora.runtime.flower.client_factory; "
            "print(json.dumps(sorted(sys.modules)))")
    modules = set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                            text=True).stdout))
    assert "fedlora.runtime.flower.client_app" in modules
    assert not {"matplotlib", "fedlora.engine.federation", "fedlora.engine.setup", "fedlora.report"} & modules


def test_the_client_app_answers_identify_and_sync_without_importing_transformers_or_peft():
    """Every Flower message runs in a process of its own: the node queries stay cheap."""
    code = "import sys, json; import fedlora.runtime.flower.client_app; print(json.dumps(sorted(sys.modules)))"
    modules = set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                            text=True).stdout))
    assert not {"transformers", "peft"} & modules


def test_listing_methods_and_building_the_cli_import_no_torch():
    code = ("import sys; import fedlora.cli; from fedlora.aggregation.registry import describe_methods; "
            "describe_methods(); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip() == "False"


@pytest.mark.parametrize("method", available_aggregators())
def test_every_method_resumed_from_its_checkpoint_equals_the_uninterrupted_run(client_dir, tmp_path, method):
    ranks = [2] if not get_aggregator(method).heterogeneous_ranks else [2, 1, 1]
    overrides = {"method": method, "ranks": ranks, "rounds": 2}
    uninterrupted = run(config_for(client_dir, tmp_path / "full", **overrides), tmp_path / "full")
    first = config_for(client_dir, tmp_path / "resumed", **{**overrides, "rounds": 1})
    run(first, tmp_path / "resumed")
    assert run(first.replace(rounds=2), tmp_path / "resumed") == uninterrupted


def _fedlora_imports(path: Path) -> set[str]:
    """The fedlora modules a file imports anywhere in it (typing-only and function-local too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedlora"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("fedlora"))
    return names


def test_no_two_modules_import_each_other_even_for_typing():
    modules = {".".join(("fedlora", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): path
               for path in SRC.rglob("*.py")}
    graph = {name: {imported for imported in _fedlora_imports(path) if imported in modules and imported != name}
             for name, path in modules.items() if not path.name == "__init__.py"}  # a package's face hands names on
    visiting, done = [], set()

    def visit(name: str) -> None:
        assert name not in visiting, " -> ".join([*visiting[visiting.index(name):], name])
        if name in done or name not in graph:
            return
        visiting.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_what_fedlora_methods_reads_from_source_is_what_each_class_holds():
    """Options inherited from a base's Options included, in the dataclass's order."""
    for name, facts in describe_methods().items():
        method = aggregator_class(name)
        assert [(o.name, o.default, o.help) for o in facts.options] == [
            (f.name, f.default, f.metadata["help"]) for f in fields(method.Options)], name
        for attribute in ATTRIBUTES:
            assert getattr(facts, attribute) == getattr(method, attribute), (name, attribute)
