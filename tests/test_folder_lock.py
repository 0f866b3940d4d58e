"""One writer per run or sweep folder: a second fedlora process on it is refused at once, and a
holder that dies, even by SIGKILL, leaves no stale lock."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.files import FolderInUse, folder_lock
from fedlora.sweep import load_sweep, run_sweep

HOLD = "import sys, time; from pathlib import Path; from fedlora.files import folder_lock\n" \
       "with folder_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)"


def holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    return process


def test_a_held_folder_is_refused_naming_it_and_the_holder_and_freed_when_the_holder_is_killed(tmp_path):
    process = holder(tmp_path)
    try:
        with pytest.raises(FolderInUse, match=f"{tmp_path} is in use by another fedlora process \\(pid {process.pid}\\)"):
            with folder_lock(tmp_path):
                pass
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    with folder_lock(tmp_path):  # the OS dropped the dead holder's lock
        with pytest.raises(FolderInUse):  # and the lock excludes this process's second holder too
            with folder_lock(tmp_path):
                pass


def test_a_missing_folder_is_named_not_created(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        with folder_lock(tmp_path / "no-such-run"):
            pass
    assert not (tmp_path / "no-such-run").exists()


def test_run_resume_and_sweep_refuse_a_folder_another_process_uses(client_dir, tmp_path):
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    run_dir.mkdir()
    sweep_dir.mkdir()
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(f'[run]\nmodel = "tiny-llama"\ndata = "{client_dir}"\n[settings.s]\nmethods = ["flora"]\n')
    for folder in (run_dir, sweep_dir):
        process = holder(folder)
        try:
            args = (["run", "--model", "tiny-llama", "--data", str(client_dir), "--out", str(run_dir)] if folder == run_dir
                    else ["sweep", str(sweep_file), "--out", str(sweep_dir)])
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2 and f"pid {process.pid}" in result.output, result.output
            assert not (folder / "config.json").exists() and not (folder / "sweep.json").exists()
            if folder == run_dir:
                result = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
                assert result.exit_code == 2 and f"pid {process.pid}" in result.output, result.output
            else:
                with pytest.raises(FolderInUse):
                    run_sweep(load_sweep(sweep_file), sweep_dir)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
