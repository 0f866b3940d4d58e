"""The benchmark scripts that train run end to end at tiny shapes, so that they keep up with the
engine's interfaces (the GPU check runs on a lent machine, where a broken part costs its time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.stats import mean_interval

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two fresh processes train tiny models: half a minute
def test_the_gpu_checks_training_parts_run_at_tiny_shapes_on_this_machine(tmp_path):
    report = tmp_path / "gpu-dry-run.md"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    environment.pop("OUT", None)  # the device tool's folder, where the check would copy its report
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--parts",
                           "step,qlora", "--report", str(report)], capture_output=True, text=True, env=environment,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = report.read_text(encoding="utf-8")
    assert "## (5) QLoRA" in text and "| tiny (dry run) | nf4 |" in text
    assert "failed" not in text, text


def _exactness_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("exactness", ROOT / "benchmarks" / "exactness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(mean: float, low: float, high: float) -> dict:
    return {"mean": mean, "ci95": [low, high]}


def test_the_exactness_sentences_call_a_difference_significant_only_where_its_interval_excludes_zero():
    exactness = _exactness_module()
    variant = {"reference": "flora", "pending": {"flexlora": "6 of 16 runs finished"}, "methods": {
        "flora": {"seeds": 10, "test_loss": _entry(2.46, 2.45, 2.47), "aggregation_error": _entry(0, 0, 0),
                  "vs_reference": None},
        "fedit": {"seeds": 10, "test_loss": _entry(2.47, 2.46, 2.48), "aggregation_error": _entry(0.18, 0.16, 0.19),
                  "vs_reference": _entry(0.011, 0.0057, 0.0163)},
        "ffa": {"seeds": 10, "test_loss": _entry(2.46, 2.45, 2.47), "aggregation_error": _entry(3e-8, 2e-8, 4e-8),
                "vs_reference": _entry(-0.002, -0.01, 0.006)},
        "centralized": {"seeds": 10, "test_loss": _entry(2.44, 2.43, 2.45), "aggregation_error": None,
                        "vs_reference": _entry(-0.02, -0.03, -0.001)}}}
    (line,) = exactness.setting_lines("homogeneous", variant)
    assert "Significantly worse than flora: fedit Δ +0.0110 [+0.0057, +0.0163]." in line
    assert "Not distinguishable from flora: ffa Δ -0.0020 [-0.0100, +0.0060]." in line
    assert "Significantly better than flora: centralized Δ -0.0200 [-0.0300, -0.0010]." in line
    assert "fedit 0.18 [0.16, 0.19]" in line and "ffa < 1e-06 (exact up to float32 rounding)" in line
    assert "centralized" not in line.split("Aggregation error:")[1]  # no aggregation to be exact about
    assert line.endswith("Not finished: flexlora (6 of 16 runs finished).")
    one_seed = {**variant, "methods": {**variant["methods"], "fedit": {**variant["methods"]["fedit"],
                                                                       "vs_reference": {"mean": 0.01, "ci95": None}}}}
    assert "Without an interval (one seed) flora: fedit Δ +0.0100." in exactness.setting_lines("x", one_seed)[0]
    headline_only = exactness.summary_lines({"headline": {"settings": {"homogeneous": variant},
                                                          "measured": {"runs": 40, "run_seconds": 7200}}})
    assert [line for line in headline_only if "not measured on this checkout yet" in line] == [
        "- **Client drift (4 rounds)**: not measured on this checkout yet (`benchmarks/drift.toml`, part of "
        "`make bench-exactness`).",
        "- **Long horizon (30 rounds × 5 local steps)**: not measured on this checkout yet "
        "(`benchmarks/horizon.toml`, part of `make bench-exactness`)."]
    assert headline_only[-1].startswith("- Measured: 40 runs in 2.0 h")
    nothing_yet = {"reference": None, "methods": {}, "pending": {"flora": "0 of 7 runs finished"}}
    assert exactness.setting_lines("steps=30", nothing_yet) == [
        "  - steps=30: the reference has not finished. Not finished: flora (0 of 7 runs finished)."]


def test_the_drift_sentence_gives_each_methods_difference_and_error_at_every_number_of_local_steps():
    exactness = _exactness_module()

    def variant(fedit_delta, fedit_error):
        return {"reference": "flora", "methods": {
            "flora": {"vs_reference": None, "aggregation_error": _entry(0, 0, 0)},
            "fedit": {"vs_reference": fedit_delta, "aggregation_error": fedit_error}}}
    headline = {"settings": {"homogeneous": variant(_entry(0.011, 0.006, 0.016), _entry(0.18, 0.16, 0.19)),
                             "heterogeneous": variant(_entry(0.5, 0.4, 0.6), _entry(0.9, 0.8, 1.0))}}
    drift = {"settings": {"homogeneous · local_steps=30": variant(_entry(0.03, 0.01, 0.05), _entry(0.4, 0.3, 0.5)),
                          "homogeneous · local_steps=10": variant(None, _entry(0.25, 0.2, 0.3))}}
    points = exactness.figure_points(headline, drift)
    assert [steps for steps, *_ in points["fedit"]] == [3, 10, 30]  # the heterogeneous headline is not a level
    assert exactness.drift_sentences(points) == [
        "fedit: Δ +0.0110 [+0.0060, +0.0160] at 3, — at 10, +0.0300 [+0.0100, +0.0500] at 30; "
        "aggregation error 0.18 [0.16, 0.19] at 3, 0.25 [0.2, 0.3] at 10, 0.4 [0.3, 0.5] at 30"]


def _versus(mean, low, high):
    return {"mean": mean, "ci95": [low, high], "significant": low > 0 or high < 0}


def test_the_verdict_says_where_exactness_paid_where_it_did_not_show_and_how_exact_rivals_fared():
    exactness = _exactness_module()
    exact, inexact = _entry(1e-8, 0, 2e-8), _entry(0.18, 0.16, 0.2)

    def method(delta, error):
        return {"vs_reference": delta, "aggregation_error": error}
    headline = {"configuration": {"rounds": [2], "local_steps": [3]}, "settings": {"homogeneous": {
        "reference": "flora", "methods": {
            "flora": method(None, exact),
            "fedit": method(_versus(0.011, 0.006, 0.016), inexact),
            "flexlora": method(_versus(0.004, -0.001, 0.009), _entry(0.105, 0.05, 0.16)),
            "ffa": method(_versus(-0.006, -0.009, -0.002), exact),
            "flora-warm": method(_versus(0.001, -0.004, 0.006), exact),
            "centralized": method(_versus(0.03, 0.02, 0.04), None)}}}}
    drift = {"configuration": {"rounds": [4], "local_steps": [10, 30]}, "settings": {"homogeneous · local_steps=30": {
        "reference": "flora", "methods": {"flora": method(None, exact),
                                          "fedit": method(_versus(-0.02, -0.03, -0.01), _entry(0.3, 0.25, 0.35))}}}}
    lines = exactness.verdict_lines({"headline": headline, "drift": drift})
    assert lines == [
        "- **Exactness paid** (an inexact method's final test loss significantly above FLoRA's): fedit, homogeneous, "
        "3 local steps × 2 rounds: Δ +0.0110 [+0.0060, +0.0160] (aggregation error 0.18).",
        "- **It did not show** (the interval contains 0): flexlora, homogeneous, 3 local steps × 2 rounds: "
        "Δ +0.0040 [-0.0010, +0.0090] (aggregation error 0.105).",
        "- **An inexact method did significantly better**: fedit, homogeneous, 30 local steps × 4 rounds: "
        "Δ -0.0200 [-0.0300, -0.0100] (aggregation error 0.3).",
        "- **Aggregation error against local steps per round** (homogeneous, mean over rounds): fedit 0.18 [0.16, "
        "0.2] at 3, 0.3 [0.25, 0.35] at 30; flexlora 0.105 [0.05, 0.16] at 3.",
        "- **Exact methods differ too** (exact as well, they train differently): ffa, homogeneous, 3 local steps × 2 "
        "rounds: Δ -0.0060 [-0.0090, -0.0020] (significantly better)."]
    nowhere = exactness.verdict_lines({"headline": {**headline, "settings": {"homogeneous": {
        "reference": "flora", "methods": {"flora": method(None, exact)}}}}})
    assert nowhere == ["- **Exactness paid** (an inexact method's final test loss significantly above FLoRA's): "
                       "nowhere.", "- **It did not show** (the interval contains 0): nowhere."]


def test_the_horizon_pairs_each_methods_last_round_with_its_lowest_and_names_the_rounds_it_stood_apart():
    exactness = _exactness_module()
    by_seed = {"0": [3.0, 2.5, 2.40, 2.45], "1": [3.0, 2.6, 2.50, 2.56], "2": [3.0, 2.4, 2.30, 2.34]}
    rise = [by_seed[s][3] - by_seed[s][2] for s in "012"]  # +0.05, +0.06, +0.04
    ffa_by_seed = {seed: [losses[0], losses[1] + 0.1, losses[2] - 0.05, losses[3] - 0.2]
                   for seed, losses in by_seed.items()}

    def curve(losses):
        return [mean_interval(list(values)).to_json() for values in zip(*losses.values())]
    comparison = {"settings": {"homogeneous": {"reference": "flora", "methods": {
        "flora": {"test_loss_per_round": curve(by_seed), "test_loss_per_round_by_seed": by_seed,
                  "vs_reference_per_round": None},
        "ffa": {"test_loss_per_round": curve(ffa_by_seed), "test_loss_per_round_by_seed": ffa_by_seed,
                "vs_reference_per_round": [_versus(0, 0, 0), _versus(0.1, 0.05, 0.15), _versus(-0.05, -0.1, 0.01),
                                           _versus(-0.2, -0.3, -0.1)]}}}}}
    flora, ffa = exactness.horizon_sentences(comparison)
    expected = mean_interval(rise)
    assert flora.startswith("flora: lowest mean test loss at round 2 (2.4000 [")
    assert (f"round 3 minus round 2, paired by seed, {expected.mean:+.4f} [{expected.low:+.4f}, "
            f"{expected.high:+.4f}] (a significant rise)") in flora
    assert expected.low > 0 and "flora's at" not in flora
    assert ffa.startswith("ffa: lowest mean test loss at round 3") and ffa.endswith(
        "the last scored round; significantly above flora's at round 1; significantly below flora's at round 3")
    comparison["configuration"] = {"rounds": [3], "local_steps": [5]}
    assert exactness.verdict_lines({"horizon": comparison})[-1] == (
        "- **Long horizon** (5 local steps × 3 rounds; each of the 3 scored rounds is tested on its own, so one "
        "significant round among them can be chance; a last round is paired with the method's lowest, picked after "
        f"the fact, which favours finding a rise): {flora}; {ffa}.")


def test_measured_errors_are_the_headlines_and_the_quality_sweeps_for_the_methods_it_left_out():
    exactness = _exactness_module()

    def comparison(**methods):
        return {"settings": {"homogeneous": {"methods": {m: {"aggregation_error": e} for m, e in methods.items()}}}}
    errors = exactness.measured_errors({
        "headline": comparison(fedit=_entry(0.177, 0.163, 0.191)),
        "quality": comparison(fedit=_entry(0.2, 0.1, 0.3), lorafair=_entry(0.05, 0.04, 0.06),
                              centralized=_entry(0.0, 0.0, 0.0), fedsa=None)})
    assert errors == {"fedit": "0.177 [0.163, 0.191] (homogeneous)",
                      "lorafair": "0.05 [0.04, 0.06] (homogeneous, quality sweep)"}


def test_perf_keeps_the_parts_it_did_not_measure_and_says_when_they_were(monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # perf imports its siblings
    spec = importlib.util.spec_from_file_location("perf", ROOT / "benchmarks" / "perf.py")
    perf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(perf)
    kept = {"step": {"lines": ["## (a) Client training step", "", "kept text", ""],
                     "rows": [["(a) ratio", "1.4", "1.4", "1.4", "≥ 1.25", "yes"]], "measured": "2026-12-01 18:16 UTC"}}
    fresh = perf.sections_of({"cli": {"--help": {"seconds": [0.2, 0.3, 0.25], "heavy_imports": []}}}, [])
    text = perf.report({**fresh, **kept}, ["cli"], 1, 0.1, 90)
    assert "in 1.5 min, measuring cli; kept as last measured (`--parts`): step (2026-12-01 18:16 UTC)." in text
    summary = [line for line in text.splitlines() if line.startswith("| (")]
    assert summary[0].startswith("| (a) ratio | 1.4") and summary[1].startswith("| (h) `fedlora --help` wall s")
    assert text.index("kept text") < text.index("## (h) CLI start-up")  # the parts in their own order
    assert "kept as last measured" not in perf.report(fresh, ["cli"], 1, 0.1, 90)


def test_every_fedlora_name_a_benchmark_imports_exists():
    """The benchmarks run rarely (hours); an import left behind by a move must fail here, not there."""
    import ast
    import importlib

    missing = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedlora"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    submodule = hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}")
                    if not hasattr(module, alias.name) and not submodule:
                        missing.append(f"{path.name}:{node.lineno} {node.module}.{alias.name}")
    assert not missing
