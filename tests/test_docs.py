"""The documentation: its generated pages are what the code gives, it builds strictly offline,
it documents every configuration key and method, and README stays a front page."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fedlora.aggregation import available_aggregators
from fedlora.engine.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_the_generated_pages_are_current():
    check = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr


def test_the_configuration_reference_documents_every_key_and_each_method_has_a_page():
    table = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    assert documented == set(RunConfig.__dataclass_fields__)
    for name in available_aggregators():
        page = (ROOT / "docs" / "methods" / f"{name}.md").read_text(encoding="utf-8")
        assert f"# `{name}`" in page and "aggregation" in page


def test_the_site_builds_strictly_offline(tmp_path):
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"})
    assert build.returncode == 0, build.stderr[-2000:]
    assert (tmp_path / "site" / "methods" / "flora" / "index.html").is_file()
    assert "FLoRA" in (tmp_path / "site" / "methods" / "flora" / "index.html").read_text(encoding="utf-8")


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count("\n") <= 200
    for page in ("docs/getting-started.md", "docs/configuration.md", "docs/methods/index.md", "docs/api.md"):
        assert f"]({page})" in readme and (ROOT / page).is_file()


def readme_commands() -> list[list[str]]:
    """Every ``fedlora …`` command of README's code blocks (continuation lines joined)."""
    import shlex

    blocks = (ROOT / "README.md").read_text(encoding="utf-8").split("```")[1::2]
    text = "\n".join(block for block in blocks if block.startswith("bash")).replace("\\\n", " ")
    return [shlex.split(line.split("#", 1)[0])[1:] for line in text.splitlines() if line.startswith("fedlora ")]


def test_every_readme_command_parses_with_its_flags():
    """Each command names a real subcommand and real flags (parsed as the CLI would, not run)."""
    import typer.main

    from fedlora import cli

    group = typer.main.get_command(cli.app)
    commands = readme_commands()
    assert len(commands) >= 8
    for args in commands:
        command = group.get_command(None, args[0])
        assert command is not None, args
        command.make_context(args[0], args[1:])  # raises on an unknown flag or a missing argument
