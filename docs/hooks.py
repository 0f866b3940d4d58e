"""MkDocs hook: the benchmarks' plots appear in the site as ``results/<name>.png``, read from
``benchmarks/results/`` where the benchmarks write them, so a clean clone builds without a copy step."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def on_files(files, config):
    for plot in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{plot.name}", abs_src_path=str(plot)))
    return files
