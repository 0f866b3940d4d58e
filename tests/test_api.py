"""fedlora from Python, as a notebook uses it: run, read the result, resume, load, observe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedlora
from fedlora.engine.config import ConfigError, RunConfig

from support import tiny_config

TINY = {"model": "tiny-llama", "dtype": "float32", "rounds": 2, "local_steps": 1, "batch_size": 2,
        "max_length": 32, "ranks": [4, 2, 1], "lr": 1e-2, "mmlu_limit": 0}


class Recorder(fedlora.RunObserver):
    """User code watching a run: every event it is told of, in order."""

    def __init__(self):
        self.events: list[tuple] = []

    def run_started(self, config, run_dir):
        self.events.append(("run_started", config.method, Path(run_dir).name))

    def round_started(self, server_round, tasks):
        self.events.append(("round_started", server_round, len(tasks)))

    def round_finished(self, row):
        self.events.append(("round_finished", row.round, row.eval_loss))

    def run_finished(self, result):
        self.events.append(("run_finished", result.summary["rounds"]))


def test_a_federation_run_from_python_returns_its_result_and_resumes(client_dir, tmp_path):
    recorder = Recorder()
    result = fedlora.run({**TINY, "data": str(client_dir)}, out=tmp_path / "run", observers=[recorder], seed=3)
    # the result: per-round metrics, the summary and the run folder's files
    assert [row.round for row in result.rows] == [0, 1, 2] and result.config.seed == 3
    assert result.rows[-1].eval_loss < result.rows[0].eval_loss
    assert result.summary["rounds"] == 2 and result.summary["communication"]["participations"] > 0
    for path in (result.paths.config, result.paths.metrics, result.paths.summary, result.paths.report,
                 result.paths.curves, result.paths.checkpoints):
        assert path.exists(), path
    assert result.metric("eval_loss") == [(row.round, row.eval_loss) for row in result.rows]
    assert [r for r, _ in result.metric("aggregation_error")] == [1, 2]  # measured in the trained rounds
    # every event, in order, to the user's observer
    assert recorder.events[0] == ("run_started", "flora", "run")
    assert [e[0] for e in recorder.events[1:]] == ["round_finished", "round_started", "round_finished",
                                                   "round_started", "round_finished", "run_finished"]
    assert recorder.events[-2] == ("round_finished", 2, result.rows[-1].eval_loss)

    # resumed to 3 rounds: the rows of the first two are the same, one more is added
    resumed = fedlora.resume(result.run_dir, rounds=3)
    assert [row.to_json() for row in resumed.rows[:3]] == [row.to_json() for row in result.rows]
    assert resumed.rows[-1].round == 3 and resumed.config.rounds == 3
    loaded = fedlora.load_run(result.run_dir)
    assert loaded.summary == resumed.summary and [r.round for r in loaded.rows] == [0, 1, 2, 3]


def test_run_takes_a_run_config_a_dict_or_a_toml_file_with_overrides(client_dir, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("\n".join(f"{key} = {json.dumps(value)}" for key, value in {**TINY, "rounds": 1,
                                                                               "data": str(client_dir)}.items()))
    from_file = fedlora.run(toml, out=tmp_path / "toml", method="fedit", ranks=[2])
    from_config = fedlora.run(tiny_config(client_dir, tmp_path / "config", rounds=1, local_steps=1, batch_size=2,
                                          max_length=32, mmlu_limit=0, method="fedit", ranks=[2]))
    assert isinstance(from_config.config, RunConfig)
    assert [r.eval_loss for r in from_file.rows] == [r.eval_loss for r in from_config.rows]


def test_a_folder_holding_a_run_and_a_bad_key_are_refused_in_one_line(client_dir, tmp_path):
    fedlora.run({**TINY, "rounds": 1, "data": str(client_dir)}, out=tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run; continue it with"):
        fedlora.run({**TINY, "data": str(client_dir)}, out=tmp_path / "run")
    with pytest.raises(ConfigError, match="unknown key 'rouns' \\(did you mean 'rounds'\\?\\)"):
        fedlora.run({**TINY, "data": str(client_dir)}, out=tmp_path / "other", rouns=2)
