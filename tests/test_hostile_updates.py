"""Broken or malicious client updates are dropped with a recorded reason; the round goes on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fedlora.aggregation import ClientUpdate
from fedlora.engine.config import build_config
from fedlora.engine.setup import prepare_run

from support import make_records


@pytest.fixture
def five_clients(tmp_path: Path) -> Path:
    folder = tmp_path / "five"
    folder.mkdir()
    for client in range(5):
        (folder / f"local_training_{client}.json").write_text(json.dumps(make_records(client, 6 + 2 * client)))
    (folder / "global_test.json").write_text(json.dumps(make_records(9, 4)))
    return folder


def trained_round(data: Path, out: Path, **overrides):
    values = {"model": "tiny-llama", "data": str(data), "rounds": 1, "local_steps": 1, "batch_size": 2,
              "max_length": 32, "ranks": [2], "lr": 1e-2, "out": str(out)}
    setup = prepare_run(build_config({**values, **overrides}), out, log=lambda message: None)
    setup.federation.start()
    tasks = setup.federation.configure_train(1)
    results = [setup.trainer.train(task, setup.client_examples[task.client_id]) for task in tasks]
    return setup.federation, results


def with_factors(result, module: str, **changes):
    factors = dict(result.update.factors)
    factors[module] = dataclasses.replace(factors[module], **changes)
    update = ClientUpdate(factors, result.update.num_examples, result.update.client_id)
    return dataclasses.replace(result, update=update)


def test_nan_and_wrong_shape_updates_are_dropped_and_the_rest_aggregated(five_clients, tmp_path):
    federation, results = trained_round(five_clients, tmp_path / "hostile")
    module = next(iter(results[0].update.factors))
    poisoned = results[1].update.factors[module].A.clone()
    poisoned[0, 0] = float("nan")
    wrong = results[3].update.factors[module]
    bad = list(results)
    bad[1] = with_factors(results[1], module, A=poisoned)
    bad[3] = with_factors(results[3], module, A=torch.zeros(2, wrong.A.shape[1] + 1))
    row = federation.aggregate_train(1, bad).to_json()

    healthy_federation, healthy = trained_round(five_clients, tmp_path / "healthy")
    healthy_federation.aggregate_train(1, [healthy[i] for i in (0, 2, 4)])

    assert row["clients"] == ["0", "2", "4"]
    assert {(r["client_id"], r["module"], r["rule"]) for r in row["rejected"]} == {
        ("1", module, "finite"), ("3", module, "shape")}
    for name, weight in federation.global_model.adapted_weights().items():
        assert torch.equal(weight, healthy_federation.global_model.adapted_weights()[name]), name
    assert federation.rows[-1].rejected == row["rejected"]


def test_too_few_usable_updates_skip_the_round_and_keep_the_model(five_clients, tmp_path):
    federation, results = trained_round(five_clients, tmp_path / "run", min_clients=4)
    before = federation.global_model.adapted_weights()
    module = next(iter(results[0].update.factors))
    nan_B = torch.full_like(results[0].update.factors[module].B, float("nan"))
    broken = [with_factors(r, module, B=nan_B) if i < 2 else r for i, r in enumerate(results)]
    row = federation.aggregate_train(1, broken).to_json()
    assert row["skipped"] is True
    assert len(row["rejected"]) == 2
    for name, weight in federation.global_model.adapted_weights().items():
        assert torch.equal(weight, before[name])


def test_norm_bound_and_example_cap(five_clients, tmp_path):
    federation, results = trained_round(five_clients, tmp_path / "run", max_update_norm=1.0, max_examples=12)
    module = next(iter(results[0].update.factors))
    f = results[0].update.factors[module]
    huge = with_factors(results[0], module, B=torch.full_like(f.B, 100.0), A=torch.full_like(f.A, 100.0))
    row = federation.aggregate_train(1, [huge] + results[1:]).to_json()
    rules = {r["client_id"]: r["rule"] for r in row["rejected"]}
    assert rules["0"] == "norm"
    assert rules["4"] == "num_examples"  # client 4 has 14 examples, above the cap of 12


def test_a_wrong_scale_is_rejected(five_clients, tmp_path):
    federation, results = trained_round(five_clients, tmp_path / "run")
    module = next(iter(results[2].update.factors))
    row = federation.aggregate_train(1, [with_factors(r, module, scale=0.5) if i == 2 else r
                                         for i, r in enumerate(results)]).to_json()
    assert [(r["client_id"], r["rule"]) for r in row["rejected"]] == [("2", "scale")]


@pytest.mark.parametrize("method", ["ffa", "rolora"])
def test_a_frozen_factor_is_not_uploaded_so_a_changed_one_never_reaches_the_aggregate(five_clients, tmp_path,
                                                                                     method):
    """The server takes a factor clients do not send from the start it sent them (in round 1
    drawn from the run's seed): whatever a client holds in its place changes nothing."""
    federation, results = trained_round(five_clients, tmp_path / method, method=method)
    module = next(iter(results[0].update.factors))
    changed = results[0].update.factors[module].A + 1e-3  # both methods keep A frozen in round 1
    row = federation.aggregate_train(1, [with_factors(results[0], module, A=changed)] + results[1:]).to_json()
    honest, unchanged = trained_round(five_clients, tmp_path / f"{method}-honest", method=method)
    honest.aggregate_train(1, unchanged)
    assert not row["rejected"] and row["clients"] == ["0", "1", "2", "3", "4"]
    for name, factors in honest.method.global_update.factors.items():
        got = federation.method.global_update.factors[name]
        assert torch.equal(got.A, factors.A) and torch.equal(got.B, factors.B), name


def test_an_update_from_a_client_that_was_not_asked_is_rejected(five_clients, tmp_path):
    federation, results = trained_round(five_clients, tmp_path / "run", clients_per_round=2)
    asked = {r.update.client_id for r in results}
    intruder = dataclasses.replace(results[0], update=ClientUpdate(
        results[0].update.factors, 5, next(c for c in "01234" if c not in asked)))
    row = federation.aggregate_train(1, results + [intruder]).to_json()
    assert [r["rule"] for r in row["rejected"]] == ["unexpected"]
    assert sorted(row["clients"]) == sorted(asked)

