"""Experiment trackers: a run's configuration, every round's metrics (the round as the step) and
its final outputs, logged to TensorBoard, MLflow or Weights & Biases as the configuration's
``report_to`` names them. Each is a :class:`~fedlora.runtime.observer.RunObserver` writing
through its library's own API, imported only when named (extras ``fedlora[tensorboard]``,
``[mlflow]``, ``[wandb]``, ``[trackers]``).

Where they write: TensorBoard to ``<run>/tensorboard``; MLflow to ``$MLFLOW_TRACKING_URI``,
else a local SQLite store ``mlflow.db`` (MLflow's recommended local backend) with artifacts in
``mlartifacts/``, in the run folder (a sweep's: one store in the sweep folder, one experiment
per sweep); W&B to project ``$WANDB_PROJECT`` (default ``fedlora``), online with an
API key in ``$WANDB_API_KEY`` or ``$WANDB_MODE=online``, otherwise offline under the run folder
(``wandb sync`` uploads it later). A sweep groups its runs (MLflow experiment, W&B group).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

from fedlora.engine.config import RunConfig
from fedlora.engine.rows import RoundRow
from fedlora.runtime.observer import RunObserver

#: files of a finished run every tracker keeps (those that exist)
OUTPUTS = ("config.json", "summary.json", "metrics.jsonl", "report.md", "curves.png")


@dataclass(frozen=True)
class TrackerGroup:
    """Runs logged together (a sweep's): their name, and the folder holding their shared stores."""

    name: str
    folder: Path


def trackers_for(config: RunConfig, run_dir: Path, group: TrackerGroup | None = None) -> list[RunObserver]:
    """The observers ``config.report_to`` asks for."""
    makers = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}
    return [makers[name](Path(run_dir), group) for name in config.report_to]


def round_metrics(row: RoundRow) -> dict[str, float]:
    """Every finite number a row holds (its fields, the method's diagnostics and each lm-eval
    task's metrics as ``<task>/<metric>``), by name."""
    values = {**{key: value for key, value in row.to_json().items() if key != "round"}, **row.extra,
              **{f"{task}/{metric}": value for task, scores in (row.tasks or {}).items()
                 for metric, value in scores.items()}}
    return {key: float(value) for key, value in values.items()
            if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)}


def config_params(config: RunConfig) -> dict[str, str]:
    """The configuration as flat string parameters (lists and tables as JSON)."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in config.to_dict().items()}


def run_name(run_dir: Path, group: TrackerGroup | None) -> str:
    """The run folder, relative to its group's folder (a sweep's ``setting/method/point``)."""
    return str(run_dir.relative_to(group.folder)) if group is not None else run_dir.name


class TensorBoardTracker(RunObserver):
    """Scalars in ``<run>/tensorboard``: every metric against the round; the configuration and
    the summary as text."""

    def __init__(self, run_dir: Path, group: TrackerGroup | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def run_started(self, config: RunConfig, run_dir: Path) -> None:
        self.writer.add_text("config", f"```\n{json.dumps(config.to_dict(), indent=2)}\n```")

    def round_finished(self, row: RoundRow) -> None:
        for key, value in round_metrics(row).items():
            self.writer.add_scalar(key, value, global_step=row.round)
        self.writer.flush()

    def run_finished(self, result) -> None:
        self.writer.add_text("summary", f"```\n{json.dumps(result.summary, indent=2, default=str)}\n```")
        self.writer.close()


def mlflow_store(folder: Path) -> str:
    """The local MLflow tracking URI of a run (or sweep) folder."""
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


class MLflowTracker(RunObserver):
    """One MLflow run: the configuration as parameters, every metric with the round as its step,
    the run's outputs as artifacts."""

    def __init__(self, run_dir: Path, group: TrackerGroup | None = None):
        from mlflow.tracking import MlflowClient

        folder = (group.folder if group is not None else run_dir).resolve()
        self.client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or mlflow_store(folder))
        experiment = group.name if group is not None else "fedlora"
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(
            experiment, artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI") else
            (folder / "mlartifacts").as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=run_name(run_dir, group)).info.run_id

    def run_started(self, config: RunConfig, run_dir: Path) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(key, value) for key, value in config_params(config).items()])

    def round_finished(self, row: RoundRow) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, row.round)
                                                    for key, value in round_metrics(row).items()])

    def run_finished(self, result) -> None:
        for name in OUTPUTS:
            if (result.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(result.run_dir / name))
        self.client.set_terminated(self.run_id)


class WandbTracker(RunObserver):
    """One W&B run: the configuration as its config, every metric logged at the round as its
    step, the run's outputs as an artifact."""

    def __init__(self, run_dir: Path, group: TrackerGroup | None = None):
        self.run_dir = run_dir
        self.group = group
        self.run = None

    def run_started(self, config: RunConfig, run_dir: Path) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fedlora"), dir=str(run_dir), mode=mode,
                              name=run_name(run_dir, self.group), group=self.group.name if self.group else None,
                              config=config.to_dict())

    def round_finished(self, row: RoundRow) -> None:
        self.run.log(round_metrics(row), step=row.round)

    def run_finished(self, result) -> None:
        import wandb

        outputs = wandb.Artifact(f"outputs-{self.run.id}", type="run-outputs")
        for name in OUTPUTS:
            if (result.run_dir / name).is_file():
                outputs.add_file(str(result.run_dir / name))
        self.run.log_artifact(outputs)
        self.run.summary.update({key: value for key, value in result.summary.items()
                                 if isinstance(value, (int, float, str))})
        self.run.finish()
        wandb.teardown()  # finish() may return before an offline run's log is on disk; this waits for it
