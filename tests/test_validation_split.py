"""The validation records: seeded, disjoint from training, the same after a resume and on a
Flower SuperNode, and scored as val_loss every round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.data import DataError, Record, load_records, split_clients, tokenize_records
from fedlora.engine.config import ConfigError, RunConfig, build_config, save_config
from fedlora.engine.setup import prepare_run
from fedlora.engine.metrics import read_metrics
from fedlora.runtime.inprocess import run_inprocess
from support import run_tiny


def records(count: int, client: int = 0) -> list[Record]:
    return [Record(f"question {client}/{i}", "", f"answer {i}") for i in range(count)]


CLIENTS = {"a": records(40, 0), "b": records(7, 1), "c": records(2, 2)}


def test_each_client_holds_out_a_seeded_share_disjoint_from_its_training():
    training, validation = split_clients(CLIENTS, 0.1, seed=3)
    held = {client: [r for r in validation if r in CLIENTS[client]] for client in CLIENTS}
    assert {client: len(part) for client, part in held.items()} == {"a": 4, "b": 1, "c": 1}  # ≥ 1 each
    for client, original in CLIENTS.items():
        assert not set(training[client]) & set(held[client])
        assert sorted(training[client] + held[client], key=original.index) == original
        assert training[client] == [r for r in original if r in training[client]]  # order kept
    assert validation == held["a"] + held["b"] + held["c"]  # pooled in client order

    assert split_clients(CLIENTS, 0.1, seed=3) == (training, validation)
    assert split_clients(CLIENTS, 0.1, seed=4)[1] != validation
    assert split_clients(CLIENTS, 0.0, seed=3) == (CLIENTS, [])


def test_a_client_too_small_to_give_a_record_is_named():
    with pytest.raises(DataError, match="client lonely: has 1 record.*validation_fraction"):
        split_clients({"big": records(10), "lonely": records(1)}, 0.05, seed=0)


@pytest.mark.parametrize("value, message", [(-0.1, "must be ≥ 0"), (float("nan"), "must be ≥ 0"),
                                            (1.0, "must be below 1")])
def test_validation_fraction_outside_zero_to_one_is_a_config_error(value, message):
    with pytest.raises(ConfigError, match=f"'validation_fraction' {message}"):
        build_config({"validation_fraction": value})


def token_ids(examples) -> list[list[int]]:
    return [examples[i].input_ids for i in range(len(examples))]


def tiny(client_dir: Path, out: Path, **overrides):
    values = {"model": "tiny-llama", "data": str(client_dir), "rounds": 2, "local_steps": 1, "batch_size": 2,
              "max_length": 32, "ranks": [2], "lr": 1e-2, "validation_fraction": 0.2, "val_every": 1, "out": str(out)}
    config = build_config({**values, **overrides})
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    return config, prepare_run(config, out, log=lambda message: None)


def test_a_run_trains_without_its_validation_records_and_scores_them_every_round(client_dir, tmp_path):
    config, setup = tiny(client_dir, tmp_path / "run")
    training, validation = split_clients({c: load_records(client_dir / f"local_training_{c}.json") for c in "012"},
                                         0.2, seed=config.seed)
    assert {cid: len(examples) for cid, examples in setup.client_examples.items()} == {"0": 6, "1": 10, "2": 16}
    for cid, examples in setup.client_examples.items():
        assert token_ids(examples) == token_ids(tokenize_records(setup.tokenizer, training[cid], 32)[0])
    assert len(setup.federation.evaluate_model.validation_examples) == len(validation) == 8
    run_inprocess(setup)
    rows = read_metrics(tmp_path / "run")
    assert all(row["val_loss"] > 0 for row in rows) and rows[-1]["val_loss"] != rows[0]["val_loss"]


def test_the_split_is_the_same_after_a_resume(client_dir, tmp_path):
    _, setup = tiny(client_dir, tmp_path / "whole")
    run_inprocess(setup)
    _, setup = tiny(client_dir, tmp_path / "resumed", rounds=1)
    run_inprocess(setup)
    _, setup = tiny(client_dir, tmp_path / "resumed", rounds=2)
    run_inprocess(setup)
    values = [[(row["round"], row["val_loss"], row["eval_loss"], row["train_loss"])
               for row in read_metrics(tmp_path / name)] for name in ("whole", "resumed")]
    assert values[0] == values[1]


def test_the_centralized_baseline_is_validated_on_the_same_records(client_dir, tmp_path):
    _, federated = tiny(client_dir, tmp_path / "flora")
    _, centralized = tiny(client_dir, tmp_path / "centralized", method="centralized")
    assert len(centralized.client_examples["centralized"]) == 32
    assert [e.input_ids for e in centralized.federation.evaluate_model.validation_examples] == \
        [e.input_ids for e in federated.federation.evaluate_model.validation_examples]


def test_a_flower_supernode_holds_out_the_records_the_server_does(client_dir, tmp_path):
    from fedlora.runtime.flower.settings import AppSettings, NodeSettings
    from fedlora.runtime.flower.client_factory import client_factory

    config, setup = tiny(client_dir, tmp_path / "run")
    settings = AppSettings(run_dir=str(tmp_path / "run"), federation_factory="", client_factory="",
                           run_config=json.dumps(config.to_dict()))
    own_file = tmp_path / "node-records.json"
    own_file.write_text((client_dir / "local_training_1.json").read_text())
    for node in (NodeSettings(1), NodeSettings(1, data=str(own_file))):
        _, examples = client_factory(settings, node)
        assert token_ids(examples) == token_ids(setup.client_examples["1"])


def test_a_client_of_the_shared_fixture_keeps_all_but_one_record_by_default(client_dir, tmp_path):
    # the default fraction (2 %) of 8, 12 and 20 records still holds one record each out
    config = build_config({"model": "tiny-llama", "data": str(client_dir), "ranks": [2], "max_length": 32})
    setup = prepare_run(config, tmp_path, log=lambda message: None)
    assert {cid: len(e) for cid, e in setup.client_examples.items()} == {"0": 7, "1": 11, "2": 19}


def test_eval_every_scores_the_test_set_on_round_0_every_kth_and_the_last_round_and_val_every_the_validation(
        client_dir, tmp_path):
    every_round = run_tiny(client_dir, tmp_path / "every", rounds=4, validation_fraction=0.2, val_every=1)
    sparse = run_tiny(client_dir, tmp_path / "sparse", rounds=4, validation_fraction=0.2, eval_every=3, val_every=2)
    assert RunConfig().val_every == 0
    by_default = run_tiny(client_dir, tmp_path / "default", rounds=4, validation_fraction=0.2, val_every=0)
    assert [row["round"] for row in sparse if "eval_loss" in row] == [0, 3, 4]
    assert [row["round"] for row in sparse if "val_loss" in row] == [0, 2, 4]
    # by default the validation loss only where tuning reads it: the final round
    assert [row["round"] for row in by_default if "val_loss" in row] == [4]
    for dense, row, default in zip(every_round, sparse, by_default):  # skipping an evaluation changes no training
        assert row["train_loss"] == dense["train_loss"] == default["train_loss"]
        assert row.get("eval_loss", dense["eval_loss"]) == dense["eval_loss"] == default["eval_loss"]
        assert row.get("val_loss", dense["val_loss"]) == dense["val_loss"] == default.get("val_loss", dense["val_loss"])
