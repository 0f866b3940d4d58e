"""The command line as a user meets it: one-line errors, outputs, resume, export, eval, report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedlora import cli
from fedlora.aggregation import aggregator_class, available_aggregators
from fedlora.engine.config import ConfigError, RunConfig, build_config
from fedlora.models import load_model

runner = CliRunner()
TINY = ["--model", "tiny-llama", "--local-steps", "1", "--batch-size", "2", "--max-length", "32"]


def invoke(*args: str):
    return runner.invoke(cli.app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error_lines = result.output[result.output.index("error:"):].splitlines()
    assert len(error_lines) == 1, f"the error is wrapped: {error_lines}"  # a long path must not break it
    return error_lines[0]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Config errors must surface before any model is loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")
    monkeypatch.setattr("fedlora.engine.inputs.load_model", refuse)


def test_methods_lists_every_aggregator_and_baseline():
    result = invoke("methods")
    assert result.exit_code == 0
    for name in available_aggregators():
        assert name in result.output
    # each method's summary line whole: FLoRA's "B = [p_1 s_1 B_1 | …]" is not taken for markup
    output = " ".join(result.output.split())
    for name in available_aggregators():
        summary = " ".join(aggregator_class(name).__doc__.strip().splitlines()[0].split())
        assert summary in output, name


def test_output_that_is_not_a_terminal_gets_the_whole_table(monkeypatch):
    from fedlora.engine.rows import RoundRow
    from fedlora.report import console_table

    monkeypatch.delenv("COLUMNS", raising=False)
    console = cli.make_console()  # pytest captures stdout: not a terminal
    row = {"round": 3, "method": "flexlora", "eval_loss": 2.4467, "perplexity": 11.55, "mmlu_acc": 0.2,
           "train_loss": 2.3722, "bytes_up": 2_768_240, "bytes_down": 1_439_642_828, "seconds": 1031.0}
    with console.capture() as captured:
        console.print(console_table([RoundRow.from_json(row)]))
    assert "…" not in captured.get() and "flexlora" in captured.get() and "1.34 GiB" in captured.get()
    monkeypatch.setenv("COLUMNS", "60")
    assert cli.make_console().width == 60


@pytest.mark.parametrize("toml, expected", [
    ("rnds = 3\n", ["bad.toml", "unknown key 'rnds'", "did you mean 'rounds'"]),
    ("ranks = [0]\n", ["bad.toml", "'ranks'", "≥ 1"]),
    ("fraction = 1.5\n", ["bad.toml", "'fraction'", "(0, 1]"]),
    ("fraction = 0\n", ["bad.toml", "'fraction'"]),
    ("method = 'fedit'\nranks = [8, 4]\n", ["bad.toml", "'ranks'", "mixed", "flora", "zeropad"]),
    ("method = 'fedavg'\n", ["bad.toml", "'method'", "flora"]),
    ("rounds = 'three'\n", ["bad.toml", "'rounds' must be int", "str"]),
    ("lr = -1.0\n", ["bad.toml", "'lr'", "positive"]),
    ("rounds = [\n", ["bad.toml", "not valid TOML"]),
    ("data_on_nodes = true\nclients = 3\n", ["bad.toml", "'data_on_nodes'", "'superlink'"]),
    ("data_on_nodes = true\nruntime = 'flower'\nsuperlink = 'h:8000'\n", ["bad.toml", "'clients'"]),
    ("data_on_nodes = true\nruntime = 'flower'\nsuperlink = 'h:8000'\nclients = 3\n"
     "local_epochs = 1.0\n", ["bad.toml", "'local_epochs'", "'local_steps'"]),
])
def test_bad_config_file_is_one_clear_line(tmp_path, no_model_loading, toml, expected):
    config = tmp_path / ("a-long-folder-name-" * 6) / "bad.toml"  # the line is wider than the console
    config.parent.mkdir()
    config.write_text(toml)
    message = one_line_error(invoke("run", config, "--out", tmp_path / "run"))
    for piece in expected:
        assert piece in message
    assert not (tmp_path / "run").exists(), "nothing is written for a rejected configuration"


def test_rank_above_a_target_modules_size_is_rejected_before_loading(client_dir, tmp_path, no_model_loading):
    # tiny-llama's v_proj is 32×64 (two kv heads of 16): rank 40 cannot fit
    message = one_line_error(invoke("run", *TINY, "--data", client_dir, "--ranks", "40",
                                    "--out", tmp_path / "run"))
    assert "exceed min(d, n) = 32" in message and "v_proj" in message


@pytest.mark.parametrize("flags, expected", [
    (["--ranks", "8,4"], "'ranks' lists 2 ranks for the 3 clients of"),
    (["--clients-per-round", "4"], "'clients_per_round' is 4 but there are only the 3 clients of"),
])
def test_a_setting_that_does_not_fit_the_clients_names_the_key_and_the_data(client_dir, tmp_path, no_model_loading,
                                                                             flags, expected):
    message = one_line_error(invoke("run", *TINY, "--data", client_dir, *flags, "--out", tmp_path / "run"))
    assert expected in message and str(client_dir) in message.replace(" ", "")


def test_bad_data_file_names_file_record_and_field(client_dir, tmp_path, no_model_loading):
    broken = json.loads((client_dir / "local_training_1.json").read_text())
    broken[5]["response"] = 42
    (client_dir / "local_training_1.json").write_text(json.dumps(broken))
    message = one_line_error(invoke("run", *TINY, "--data", client_dir, "--out", tmp_path / "run"))
    assert "local_training_1.json" in message and "record 5" in message and "'response'" in message


def test_missing_data_folder_is_a_clear_error(tmp_path, no_model_loading):
    missing = tmp_path / "[site a]" / "nowhere.json"  # brackets: rich must not read them as markup
    message = one_line_error(invoke("run", *TINY, "--data", missing, "--out", tmp_path / "run"))
    assert str(missing) in message


def test_run_writes_every_output_then_export_eval_and_report(client_dir, tmp_path):
    out = tmp_path / "runs" / "flora"
    result = invoke("run", *TINY, "--data", client_dir, "--rounds", "2", "--ranks", "4,2,1",
                    "--mmlu-limit", "3", "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("config.json", "metrics.jsonl", "summary.json", "report.md", "curves.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["communication"]["bytes_up"] == sum(row["bytes_up"] for row in rows)
    assert summary["training_examples_truncated"] > 0  # max_length 32 cuts every example
    assert "communication" in result.output

    again = invoke("run", *TINY, "--data", client_dir, "--out", out)
    assert "already holds a run" in one_line_error(again)

    merged = invoke("export", out, "--merged", tmp_path / "merged")
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "merged" / "config.json").is_file()
    adapter = invoke("export", out, "--adapter", tmp_path / "adapter", "--rank", "16")
    assert adapter.exit_code == 0, adapter.output
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert "relative Frobenius error" in " ".join(adapter.output.split())
    # others can use them: the adapter names its base as given (not a cache folder) and, loaded by
    # PEFT on that base, gives the merged export's logits (rank 16 holds the whole update: two
    # rounds of ranks 4, 2 and 1); both carry a model card saying how they were made
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    tokens = torch.tensor([[1, 17, 42, 99, 7]])
    merged_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(tokens).logits
    with_adapter = PeftModel.from_pretrained(load_model("tiny-llama")[0], str(tmp_path / "adapter"))
    torch.testing.assert_close(with_adapter(tokens).logits, merged_logits, rtol=0, atol=1e-4)
    for folder in ("merged", "adapter"):
        card = (tmp_path / folder / "README.md").read_text()
        assert "base_model: tiny-llama" in card and "`flora`" in card and "| rounds | 2" in card, folder
        assert f"held-out loss after | {rows[-1]['eval_loss']:.4f}" in card, folder

    evaluated = invoke("eval", out, "--test-data", client_dir / "global_test.json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-5)

    invoke("run", *TINY, "--data", client_dir, "--rounds", "1", "--method", "fedit", "--ranks", "2",
           "--out", tmp_path / "runs" / "fedit")
    compared = invoke("report", tmp_path / "runs")
    assert compared.exit_code == 0, compared.output
    assert (tmp_path / "runs" / "curves.png").is_file()


def test_resume_continues_with_more_rounds(client_dir, tmp_path):
    out = tmp_path / "run"
    assert invoke("run", *TINY, "--data", client_dir, "--rounds", "1", "--out", out).exit_code == 0
    result = invoke("run", "--resume", out, "--rounds", "2")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert "only --rounds may change" in one_line_error(invoke("run", "--resume", out, "--lr", "0.1"))


CONFIG_KEYS = sorted(RunConfig.__dataclass_fields__) + ["bogus", "rank"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(-2, 70), max_size=4),
                   st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), VALUES, max_size=4))
def test_config_fuzz_only_raises_config_errors(values):
    try:
        build_config(values)
    except ConfigError:
        pass


def _corrupt_metrics(run: Path) -> Path:
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 0}\n{not json\n{"round": 2}\n')
    return run


@pytest.mark.parametrize("command, expected", [
    (lambda tmp: ["report", _corrupt_metrics(tmp / "run")], ["metrics.jsonl", "line 2", "not valid JSON"]),
    (lambda tmp: ["report", tmp], ["no subfolder holds a non-empty metrics.jsonl"]),
    (lambda tmp: ["report", tmp / "absent"], ["absent", "no such folder"]),
    (lambda tmp: ["eval", tmp], ["config.json", "no saved configuration"]),
    (lambda tmp: ["export", tmp, "--merged", tmp / "out"], ["config.json", "no saved configuration"]),
    (lambda tmp: ["export", tmp, "--adapter", tmp / "out"], ["--rank"]),
    (lambda tmp: ["run", *TINY, "--method-options", "{compress:", "--out", tmp / "run"],
     ["'method_options'", "JSON object"]),
    (lambda tmp: ["run", *TINY, "--method-options", '{"compress": "lossy"}', "--out", tmp / "run"],
     ["'method_options'", "compress"]),
    (lambda tmp: ["run", "--resume", tmp], ["config.json", "no saved configuration"]),
])
def test_every_command_reports_a_bad_input_as_one_line(tmp_path, no_model_loading, command, expected):
    message = one_line_error(invoke(*command(tmp_path)))
    for part in expected:
        assert part in message.replace(f"{tmp_path}/", ""), (part, message)


@pytest.mark.parametrize("command, exit_code", [
    (["--help"], 0), (["methods"], 0), (["methods", "hetlora"], 0),
    # usage errors come before any heavy import
    (["export", "run", "--merged", "a", "--adapter", "b"], 2), (["export", "run", "--adapter", "b"], 2),
    (["run", "--resume", "run", "--lr", "1e-3"], 2),
])
def test_help_methods_and_usage_errors_import_no_heavy_library(command, exit_code):
    """`fedlora --help`, `fedlora methods` and a command line a command refuses answer fast:
    torch, transformers, PEFT and Flower are imported only by the commands that use them."""
    probe = ("import sys\n"
             "sys.argv = ['fedlora', *sys.argv[1:]]\n"
             "from fedlora.cli import app\n"
             "try:\n    app()\n"
             "except SystemExit as stop:\n    print('exit', stop.code or 0)\n"
             "print(sorted(m for m in ('torch', 'transformers', 'peft', 'flwr') if m in sys.modules))\n")
    completed = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, check=True)
    *_, stopped, heavy = completed.stdout.strip().splitlines()
    assert stopped == f"exit {exit_code}" and heavy == "[]", completed.stdout
