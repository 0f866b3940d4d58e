"""The experiment trackers, offline, read back with each library's own reader: TensorBoard's
event files, an MLflow file store, a W&B offline run; and a sweep's runs logged as one group."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import fedlora
from fedlora.engine.config import ConfigError, build_config
from fedlora.sweep import run_sweep
from fedlora.sweep.plan import plan_sweep
from fedlora.engine.rows import RoundRow
from fedlora.trackers import mlflow_store, round_metrics

TINY = {"model": "tiny-llama", "dtype": "float32", "rounds": 2, "local_steps": 1, "batch_size": 2,
        "max_length": 32, "ranks": [2], "lr": 1e-2, "mmlu_limit": 0, "method": "fedit"}


def run_with(tracker: str, client_dir: Path, out: Path):
    return fedlora.run({**TINY, "data": str(client_dir), "report_to": [tracker]}, out=out)


def test_tensorboard_holds_every_rounds_metrics_at_its_round(client_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_with("tensorboard", client_dir, tmp_path / "run")
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    eval_loss = events.Scalars("eval_loss")
    assert [e.step for e in eval_loss] == [r for r, _ in result.metric("eval_loss")]
    assert [e.value for e in eval_loss] == pytest.approx([v for _, v in result.metric("eval_loss")])
    assert [e.step for e in events.Scalars("aggregation_error")] == [1, 2]
    assert "config/text_summary" in events.Tags()["tensors"]  # the configuration, as text


def test_mlflow_holds_the_config_every_rounds_metrics_and_the_outputs(client_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    result = run_with("mlflow", client_dir, tmp_path / "run")
    client = MlflowClient(tracking_uri=mlflow_store(result.run_dir))
    (run,) = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    assert run.data.params["method"] == "fedit" and run.data.params["ranks"] == "[2]"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval_loss"))
    assert [step for step, _ in history] == [r for r, _ in result.metric("eval_loss")]
    assert [value for _, value in history] == pytest.approx([v for _, v in result.metric("eval_loss")])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    artifacts = {entry.path for entry in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.jsonl", "report.md", "curves.png", "config.json"} <= artifacts


def wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline W&B log, read by W&B's own datastore."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    (log,) = run_dir.glob("wandb/offline-run-*/*.wandb")
    store = datastore.DataStore()
    store.open_for_scan(str(log))
    records = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        records.append(record)
    return records


def test_wandb_offline_holds_the_config_and_every_rounds_metrics(client_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # without a key the tracker logs offline
    result = run_with("wandb", client_dir, tmp_path / "run")
    records = wandb_records(result.run_dir)
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in started.config.update}
    assert config["method"] == "fedit" and config["rounds"] == 2 and started.display_name == "run"
    history = [{item.nested_key[0]: json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    logged = [(h["_step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    assert [step for step, _ in logged] == [r for r, _ in result.metric("eval_loss")]
    assert [value for _, value in logged] == pytest.approx([v for _, v in result.metric("eval_loss")])
    assert any(r.WhichOneof("record_type") == "artifact" for r in records)  # the run's outputs


def test_a_sweep_logs_each_run_into_one_group(client_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    document = {"run": {**TINY, "data": str(client_dir), "rounds": 1, "report_to": ["mlflow"]},
                "grid": {"seed": [0, 1]}, "settings": {"one": {"methods": ["fedit", "flora"]}}}
    run_sweep(plan_sweep(copy.deepcopy(document), str(tmp_path / "grouped.toml")), tmp_path / "sweep")
    client = MlflowClient(tracking_uri=mlflow_store(tmp_path / "sweep"))
    experiment = client.get_experiment_by_name("grouped")
    names = sorted(run.info.run_name for run in client.search_runs([experiment.experiment_id]))
    assert names == ["one/fedit/seed=0", "one/fedit/seed=1", "one/flora/seed=0", "one/flora/seed=1"]


def test_an_unknown_tracker_is_a_one_line_error():
    with pytest.raises(ConfigError, match="'report_to' names 'comet'; choose among tensorboard, mlflow, wandb"):
        build_config({"report_to": ["comet"]})


def test_a_row_logs_every_finite_number_with_lm_eval_tasks_by_task_and_metric():
    row = RoundRow.from_json({"round": 3, "method": "flora", "eval_loss": 2.5, "rouge_l": 0.25, "skipped": False,
                              "sample_generation": {"prompt": "p", "reference": "r", "answer": "a"},
                              "tasks": {"hellaswag": {"acc": 0.5, "acc_stderr": 0.1, "n": 20}},
                              "truncation_error": float("nan"), "broadcast_rank": 12})
    assert round_metrics(row) == {"eval_loss": 2.5, "rouge_l": 0.25, "hellaswag/acc": 0.5, "hellaswag/acc_stderr": 0.1,
                                  "hellaswag/n": 20.0, "broadcast_rank": 12.0, "bytes_up": 0.0, "bytes_down": 0.0,
                                  "params_up": 0.0, "params_down": 0.0, "client_seconds": 0.0,
                                  "server_seconds": 0.0, "eval_seconds": 0.0, "seconds": 0.0}
