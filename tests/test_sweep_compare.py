"""`fedlora compare`: tuning on validation loss only, and the intervals against hand computations.

The sweep folders here are written directly (a real plan, made-up metrics), so every number
the comparison reports can be checked against one computed by hand.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from fedlora.sweep.compare import build_comparison, write_comparison
from fedlora.sweep.plan import plan_sweep
from fedlora.stats import mean_interval, paired_difference, t_quantile, wilson_interval

T_975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # the t quantile for 2 degrees of freedom has a closed form
SEEDS = (0, 1, 2)
LRS = (1e-3, 1e-2, 1e-1)


def write_sweep(folder: Path, methods: tuple[str, ...], losses, *, rounds: int = 2, missing: tuple[str, ...] = (),
                rouge=None, info=None):
    """A sweep folder: the plan of a real sweep document, and for every run the metrics rows
    ``losses(method, lr, seed) -> (test_loss, val_loss)`` gives its final round (earlier rounds
    are higher by 0.1 a round); ``rouge(method, lr, seed)``, if given, the final round's ROUGE-L;
    ``info(method, seed, round)``, if given, what the method reports in each trained round's row."""
    plan = plan_sweep({"run": {"model": "tiny-llama", "rounds": rounds}, "grid": {"seed": list(SEEDS), "lr": list(LRS)},
                       "tune": {"keys": ["lr"]}, "settings": {"hom": {"ranks": [4], "methods": list(methods)}}},
                      "sweep.toml")
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps(plan.to_json()))
    for run in plan.runs:
        if run.folder in missing:
            continue
        test, val = losses(run.method, run.point["lr"], run.point["seed"])
        run_dir = folder / run.folder
        run_dir.mkdir(parents=True)
        rows = [{"round": r, "method": run.method, "eval_loss": test + 0.1 * (rounds - r),
                 "val_loss": val + 0.1 * (rounds - r)} for r in range(rounds + 1)]
        if rouge is not None:
            rows[-1]["rouge_l"] = rouge(run.method, run.point["lr"], run.point["seed"])
        for row in rows[1:] if info is not None else ():
            row.update(info(run.method, run.point["seed"], row["round"]))
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        config = {"model": "tiny-llama", "prompt_format": None, "rounds": rounds}
        (run_dir / "config.json").write_text(json.dumps(config))
        communication = {"up_vs_full_finetuning": 0.01, "down_vs_full_finetuning": 0.02}
        (run_dir / "summary.json").write_text(json.dumps({"method": run.method, "communication": communication}))
    return plan


def lr_index(lr: float) -> int:
    return LRS.index(lr)


def test_tuning_chooses_on_validation_loss_and_never_on_the_test_set(tmp_path):
    # validation prefers lr 1e-2; the test set would prefer 1e-1
    def honest(method, lr, seed):
        return (3.0 - lr_index(lr), 2.0 + abs(lr_index(lr) - 1) + 0.01 * seed)
    write_sweep(tmp_path / "honest", ("flora",), honest)
    entry = build_comparison(tmp_path / "honest")["settings"]["hom"]["methods"]["flora"]
    assert entry["chosen"] == {"lr": 1e-2}
    assert entry["runs"] == [f"hom/flora/lr=0.01,seed={s}" for s in SEEDS]
    assert entry["test_loss"]["mean"] == pytest.approx(2.0)  # read at the choice, to report it

    # the test losses poisoned to make the chosen value look terrible: the choice stands
    def poisoned(method, lr, seed):
        test, val = honest(method, lr, seed)
        return (100.0 if lr == 1e-2 else -100.0), val
    write_sweep(tmp_path / "poisoned", ("flora",), poisoned)
    entry = build_comparison(tmp_path / "poisoned")["settings"]["hom"]["methods"]["flora"]
    assert entry["chosen"] == {"lr": 1e-2} and entry["test_loss"]["mean"] == pytest.approx(100.0)

    # and the validation losses do move it
    def other_val(method, lr, seed):
        return honest(method, lr, seed)[0], 2.0 - lr_index(lr)
    write_sweep(tmp_path / "moved", ("flora",), other_val)
    entry = build_comparison(tmp_path / "moved")["settings"]["hom"]["methods"]["flora"]
    assert entry["chosen"] == {"lr": 1e-1} and entry["at_grid_edge"] == ["lr"]


def test_the_choice_is_the_mean_over_seeds_and_a_diverged_run_never_wins(tmp_path):
    val = {(1e-3, 0): 2.0, (1e-3, 1): 2.0, (1e-3, 2): 2.6,  # mean 2.2
           (1e-2, 0): 2.1, (1e-2, 1): 2.1, (1e-2, 2): 2.1,  # mean 2.1: chosen, though never the lowest seed
           (1e-1, 0): 0.0, (1e-1, 1): float("nan"), (1e-1, 2): 0.0}  # diverged in one seed
    write_sweep(tmp_path / "sweep", ("flora",), lambda method, lr, seed: (2.0, val[lr, seed]))
    entry = build_comparison(tmp_path / "sweep")["settings"]["hom"]["methods"]["flora"]
    assert entry["chosen"] == {"lr": 1e-2} and entry["at_grid_edge"] == []
    assert [c["val_loss"]["mean"] for c in entry["tuning"]][:2] == [pytest.approx(2.2), pytest.approx(2.1)]


FLORA = (2.0, 2.1, 2.3)
FEDIT = (1.9, 2.05, 2.1)  # differences −0.10, −0.05, −0.20: not significant with 3 seeds
FEDEX = (1.89, 1.99, 2.18)  # differences −0.11, −0.11, −0.12: significant


def three_methods(method, lr, seed):
    final = {"flora": FLORA, "fedit": FEDIT, "fedex": FEDEX}[method][seed]
    return (final if lr == 1e-2 else final + 1.0), (1.0 if lr == 1e-2 else 2.0)


def hand_interval(values):
    """mean ± t(0.975, 2)·s/√3, written out."""
    mean = sum(values) / 3
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = T_975_DF2 * s / math.sqrt(3)
    return mean, mean - half, mean + half


def test_intervals_and_paired_differences_match_a_hand_computation(tmp_path):
    write_sweep(tmp_path / "sweep", ("flora", "fedit", "fedex"), three_methods)
    setting = build_comparison(tmp_path / "sweep")["settings"]["hom"]
    assert setting["reference"] == "flora"
    methods = setting["methods"]
    for name, finals in (("flora", FLORA), ("fedit", FEDIT), ("fedex", FEDEX)):
        mean, low, high = hand_interval(finals)
        assert methods[name]["test_loss"]["mean"] == pytest.approx(mean, abs=1e-12)
        assert methods[name]["test_loss"]["ci95"] == pytest.approx([low, high], abs=1e-12)
        assert methods[name]["seeds"] == 3

    mean, low, high = hand_interval([a - b for a, b in zip(FEDIT, FLORA)])
    assert (mean, low, high) == pytest.approx((-0.35 / 3, -0.30640, 0.07306), abs=1e-5)
    fedit = methods["fedit"]["vs_reference"]
    assert fedit["mean"] == pytest.approx(mean, abs=1e-12) and fedit["ci95"] == pytest.approx([low, high], abs=1e-12)
    assert fedit["significant"] is False

    mean, low, high = hand_interval([a - b for a, b in zip(FEDEX, FLORA)])
    fedex = methods["fedex"]["vs_reference"]
    assert fedex["ci95"] == pytest.approx([low, high], abs=1e-12) and high < 0 and fedex["significant"] is True
    assert methods["flora"]["vs_reference"] is None

    # per round: the band of round r is the interval over seeds of that round's losses
    mean, low, high = hand_interval([f + 0.1 for f in FLORA])
    assert methods["flora"]["test_loss_per_round"][1] == {"mean": pytest.approx(mean),
                                                          "ci95": pytest.approx([low, high])}

    paths = write_comparison(tmp_path / "sweep")
    markdown = paths[1].read_text()
    assert "Significantly lower final test loss than flora (interval below 0): fedex" in markdown
    assert "Not significantly different from flora (interval contains 0): fedit" in markdown
    assert "**flora does not have the lowest mean final test loss here**" in markdown
    assert json.loads(paths[0].read_text())["settings"]["hom"]["methods"]["fedex"]["vs_reference"]["significant"]
    assert paths[2].stat().st_size > 0


def test_rouge_l_is_compared_over_seeds_and_paired_against_the_reference(tmp_path):
    rouge = {"flora": (0.30, 0.34, 0.29), "fedit": (0.25, 0.27, 0.26)}
    write_sweep(tmp_path / "sweep", ("flora", "fedit"), three_methods,
                rouge=lambda method, lr, seed: rouge[method][seed])
    # a chosen run scored after the sweep: its later ROUGE-L replaces the row's
    chosen = build_comparison(tmp_path / "sweep")["settings"]["hom"]["methods"]["fedit"]["runs"][0]
    assert chosen.endswith("seed=0")
    later = {"round": 2, "eval_loss": FEDIT[0], "rouge_l": 0.20}
    (tmp_path / "sweep" / chosen / "final-test.json").write_text(json.dumps(later))
    rouge["fedit"] = (0.20, 0.27, 0.26)
    methods = build_comparison(tmp_path / "sweep")["settings"]["hom"]["methods"]
    for name in ("flora", "fedit"):
        mean, low, high = hand_interval(rouge[name])
        assert methods[name]["rouge_l"] == {"mean": pytest.approx(mean), "ci95": pytest.approx([low, high])}
    mean, low, high = hand_interval([a - b for a, b in zip(rouge["fedit"], rouge["flora"])])
    versus = methods["fedit"]["rouge_l_vs_reference"]
    assert versus["mean"] == pytest.approx(mean) and versus["ci95"] == pytest.approx([low, high])
    assert versus["significant"] == (high < 0 or low > 0)
    markdown = write_comparison(tmp_path / "sweep")[1].read_text()
    assert "final ROUGE-L [95 % CI] | Δ ROUGE-L vs flora" in markdown
    assert f"| {mean:+.4f} [{low:+.4f}, {high:+.4f}] |" in markdown


def test_the_gap_to_the_reference_is_paired_at_every_scored_round(tmp_path):
    """A gap that is significant in round 1 and closes by the last: the final Δ alone would hide it."""
    write_sweep(tmp_path / "sweep", ("flora", "fedit"), three_methods, rounds=3)
    fedit_round_1 = (2.6, 2.72, 2.94)  # minus flora's round 1 (its final + 0.2): +0.40, +0.42, +0.44
    for seed, loss in enumerate(fedit_round_1):
        metrics = tmp_path / "sweep" / f"hom/fedit/lr=0.01,seed={seed}/metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        rows[1]["eval_loss"] = loss
        metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    methods = build_comparison(tmp_path / "sweep")["settings"]["hom"]["methods"]
    per_round = methods["fedit"]["vs_reference_per_round"]
    assert len(per_round) == 4 and methods["flora"]["vs_reference_per_round"] is None
    mean, low, high = hand_interval([a - (b + 0.2) for a, b in zip(fedit_round_1, FLORA)])
    assert (per_round[1]["mean"], *per_round[1]["ci95"]) == pytest.approx((0.42, low, high))
    assert per_round[1]["significant"] and low > 0
    for r in (0, 2, 3):  # every other round is the final gap, shifted alike
        assert per_round[r]["mean"] == pytest.approx(methods["fedit"]["vs_reference"]["mean"])
        assert per_round[r]["significant"] is False
    markdown = write_comparison(tmp_path / "sweep")[1].read_text()
    assert "| method | round 1 | round 2 | round 3 |" in markdown
    assert f"| fedit | **{0.42:+.4f} [{low:+.4f}, {high:+.4f}]** | " in markdown


def test_a_comparison_of_one_scored_round_has_no_per_round_table(tmp_path):
    write_sweep(tmp_path / "sweep", ("flora", "fedit"), three_methods, rounds=1)
    assert "at each scored round" not in write_comparison(tmp_path / "sweep")[1].read_text()


def test_what_a_method_reports_of_its_aggregation_is_averaged_over_rounds_then_seeds(tmp_path):
    def info(method, seed, server_round):
        if method == "flora":
            return {}
        # ranks sent differ by round and seed; a flag and a measure one seed lacks are left out
        return {"ranks_sent": 100 + 10 * seed + server_round, "flora_ranks": 160, "pruned": True,
                **({"occasional": 1.0} if seed else {})}
    write_sweep(tmp_path / "sweep", ("flora", "fedit"), three_methods, info=info)
    methods = build_comparison(tmp_path / "sweep")["settings"]["hom"]["methods"]
    assert methods["flora"]["method_measures"] == {}
    measures = methods["fedit"]["method_measures"]
    assert set(measures) == {"ranks_sent", "flora_ranks"}
    mean, low, high = hand_interval([100 + 10 * seed + 1.5 for seed in SEEDS])  # rounds 1 and 2 averaged first
    assert measures["ranks_sent"] == {"mean": pytest.approx(mean), "ci95": pytest.approx([low, high])}
    assert measures["flora_ranks"]["mean"] == 160
    markdown = write_comparison(tmp_path / "sweep")[1].read_text()
    assert f"- fedit: `ranks_sent` {mean:.4g} [{low:.4g}, {high:.4g}]; `flora_ranks` 160\n" in markdown
    assert "- flora:" not in markdown


def test_the_comparison_states_what_the_runs_were_trained_with_and_where_they_differ(tmp_path):
    write_sweep(tmp_path / "sweep", ("flora", "fedit"), three_methods)
    markdown = write_comparison(tmp_path / "sweep")[1].read_text()
    assert ("Runs: model tiny-llama, prompt format auto (the tokenizer's chat template where it has one, else "
            "alpaca), rounds 2.") in markdown
    # a run folder predating prompt_format was made with the Alpaca prompt
    (tmp_path / "sweep" / "hom/fedit/lr=0.1,seed=2" / "config.json").write_text(json.dumps({"model": "tiny-llama"}))
    assert "prompt format auto (the tokenizer's chat template where it has one, else alpaca) / alpaca, " in \
        write_comparison(tmp_path / "sweep")[1].read_text()


def test_a_sweep_without_generation_has_no_rouge_columns(tmp_path):
    write_sweep(tmp_path / "sweep", ("flora",), three_methods)
    assert "ROUGE-L" not in write_comparison(tmp_path / "sweep")[1].read_text()


def test_a_method_with_unfinished_runs_is_listed_and_left_out(tmp_path):
    write_sweep(tmp_path / "sweep", ("flora", "fedit"), three_methods, missing=("hom/fedit/lr=0.1,seed=2",))
    setting = build_comparison(tmp_path / "sweep")["settings"]["hom"]
    assert list(setting["methods"]) == ["flora"] and setting["pending"] == {"fedit": "8 of 9 runs finished"}
    assert "not finished, left out: fedit (8 of 9 runs finished)" in write_comparison(tmp_path / "sweep")[1].read_text()


def test_t_quantiles_match_closed_forms_and_tables():
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)
        alpha = 4 * p * (1 - p)  # df = 4 closed form
        q = math.cos(math.acos(math.sqrt(alpha)) / 3) / math.sqrt(alpha)
        assert t_quantile(p, 4) == pytest.approx(2 * math.sqrt(q - 1), rel=1e-10)
        assert t_quantile(1 - p, 7) == pytest.approx(-t_quantile(p, 7), rel=1e-12)
    # printed t tables (two-sided 95 %)
    for df, table in ((3, 3.182446), (5, 2.570582), (9, 2.262157), (29, 2.045230), (120, 1.979930)):
        assert t_quantile(0.975, df) == pytest.approx(table, abs=5e-7)
    assert t_quantile(0.975, 1e7) == pytest.approx(statistics.NormalDist().inv_cdf(0.975), rel=1e-6)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_mean_intervals_and_the_wilson_interval_by_hand():
    estimate = mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284 * math.sqrt(5 / 3) / 2  # t(0.975, 3)·s/√n
    assert (estimate.mean, estimate.low, estimate.high) == pytest.approx((2.5, 2.5 - half, 2.5 + half), rel=1e-9)
    assert mean_interval([2.0]).to_json() == {"mean": 2.0, "ci95": None}
    assert not mean_interval([2.0]).significant
    assert paired_difference([3.0, 4.0], [1.0, 2.0]).to_json() == {"mean": 2.0, "ci95": [2.0, 2.0]}

    z = statistics.NormalDist().inv_cdf(0.975)
    p, n = 90 / 300, 300
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(90, 300) == pytest.approx((0.3, center - half, center + half), rel=1e-12)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.0, abs=1e-15)
    assert wilson_interval(10, 10)[2] == pytest.approx(1.0)
