"""Run outputs: metrics.jsonl round trip, atomic summary, report.md, curves.png, comparisons."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from fedlora.engine.metrics import append_metrics, read_metrics, rewrite_metrics, write_summary
from fedlora.engine.rows import RoundRow
from fedlora.report import compare_runs, console_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_rows(method: str, losses: list[float], mmlu: dict[int, float] | None = None) -> list[dict]:
    """Metric rows as the round loop appends them: round 0 is the untrained baseline."""
    rows = []
    for round_number, loss in enumerate(losses):
        row = {"round": round_number, "method": method, "eval_loss": loss,
               "perplexity": 2.718281828 ** loss, "seconds": 1.5 * round_number}
        if round_number:
            row |= {"train_loss": loss + 0.1, "bytes_up": 1000 * round_number,
                    "bytes_down": 3 * 1024 * 1024}
        if mmlu and round_number in mmlu:
            row["mmlu_acc"] = mmlu[round_number]
        rows.append(row)
    return rows


def write_run(out_dir, rows: list[dict]) -> None:
    for row in rows:
        append_metrics(out_dir, row)


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000  # two drawn panels, not an empty canvas


def test_metrics_round_trip(tmp_path):
    rows = fake_rows("flora", [2.5, 2.0, 1.75], mmlu={0: 0.25, 2: 0.5})
    write_run(tmp_path / "run", rows)
    assert read_metrics(tmp_path / "run") == rows
    assert read_metrics(tmp_path / "absent") == []


def test_read_metrics_skips_only_an_interrupted_last_line(tmp_path):
    append_metrics(tmp_path, {"round": 0, "eval_loss": 2.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 1, "eval_lo')  # killed mid-write: no newline
    assert read_metrics(tmp_path) == [{"round": 0, "eval_loss": 2.0}]

    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("\n")  # the broken line is now a complete, corrupt line
    append_metrics(tmp_path, {"round": 2})
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2"):
        read_metrics(tmp_path)


def test_rewrite_metrics_replaces_every_row(tmp_path):
    rows = fake_rows("flora", [2.5, 2.0, 1.75])
    write_run(tmp_path, rows)
    rewrite_metrics(tmp_path, rows[:2])  # a resumed run drops the rows past its checkpoint
    assert read_metrics(tmp_path) == rows[:2]
    append_metrics(tmp_path, rows[2])
    assert read_metrics(tmp_path) == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_write_summary_is_atomic_and_replaces(tmp_path):
    write_summary(tmp_path, {"eval_loss": 3.0})
    path = write_summary(tmp_path, {"eval_loss": 1.0, "mmlu_per_subject": {"law": {"acc": 0.5, "n": 2}}})
    assert json.loads(path.read_text()) == {"eval_loss": 1.0,
                                            "mmlu_per_subject": {"law": {"acc": 0.5, "n": 2}}}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left behind


def test_write_report_contains_the_metrics(tmp_path):
    rows = fake_rows("flora", [2.5, 2.0, 1.75], mmlu={0: 0.25, 2: 0.5})
    write_run(tmp_path, rows)
    write_summary(tmp_path, {
        "method": "flora", "eval_loss": 1.75, "mmlu_acc": 0.5,
        "mmlu_per_subject": {"anatomy": {"acc": 0.75, "n": 4}, "virology": {"acc": 0.25, "n": 4}},
        "communication": {"bytes_up": 3000, "bytes_down": 6 * 1024 * 1024,
                          "up_vs_full_finetuning": 0.0123, "down_vs_full_finetuning": 0.5},
    })

    report_path, curves_path = write_report(tmp_path)

    report = report_path.read_text()
    for row in rows:
        assert f"{row['eval_loss']:.4f}" in report
        assert f"{row['perplexity']:.2f}" in report
    assert "25.00%" in report and "50.00%" in report  # mmlu_acc per round
    assert "2.1000" in report  # train_loss of round 1
    assert "3.00 MiB" in report  # bytes_down per round
    assert "| anatomy | 75.00% | 4 |" in report
    assert "| virology | 25.00% | 4 |" in report
    assert "3000 bytes" in report and "6.00 MiB" in report
    assert "up vs full fine-tuning: 1.2300%" in report
    assert report.count("\n| ") >= len(rows) + 2  # header + one line per round (+ summary)
    assert_png(curves_path)


def test_write_report_with_the_round_loop_summary(tmp_path):
    """The engine's shape: per-subject MMLU in the rows, the ledger under "communication"."""
    rows = fake_rows("rolora", [2.5, 2.0], mmlu={1: 0.5})
    rows[1] |= {"mmlu_correct": 2, "mmlu_total": 4,
                "mmlu_per_subject": {"law": {"acc": 1.0, "n": 2}, "math": {"acc": 0.0, "n": 2}}}
    write_run(tmp_path, rows)
    write_summary(tmp_path, {"method": "rolora", "rounds": 1, "final": rows[-1],
                             "best_eval_loss": 2.0,
                             "communication": {"bytes_up": 1000, "bytes_down": 3145728,
                                               "up_vs_full_finetuning": 0.002,
                                               "down_vs_full_finetuning": 0.004}})
    report = write_report(tmp_path)[0].read_text()
    assert "| best_eval_loss | 2 |" in report
    assert "| final eval_loss | 2.0000 |" in report
    # 2 of 4 right: Wilson 95 % interval 0.5 ± 1.96·√(0.25/4 + 1.96²/64)/(1 + 1.96²/4) = [0.150, 0.850]
    assert "| final mmlu_acc | 50.0% [15.0, 85.0] n=4 |" in report
    assert "### MMLU per subject (round 1)" in report
    assert "| law | 100.00% | 2 |" in report and "| math | 0.00% | 2 |" in report
    assert "down vs full fine-tuning: 0.4000%" in report


def test_write_report_without_summary_or_mmlu(tmp_path):
    write_run(tmp_path, fake_rows("fedavg", [3.0, 2.0]))
    report_path, curves_path = write_report(tmp_path)
    report = report_path.read_text()
    assert "3.0000" in report and "2.0000" in report
    assert "MMLU per subject" not in report
    assert "total up: 1000 B" in report  # summed from the rows
    assert_png(curves_path)


def test_write_report_without_metrics_fails_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match="metrics.jsonl"):
        write_report(tmp_path)


def test_compare_runs(tmp_path):
    write_run(tmp_path / "flora", fake_rows("flora", [2.5, 1.5, 1.8], mmlu={2: 0.4}))
    write_run(tmp_path / "baseline", fake_rows("fedavg", [2.5, 2.2]))
    (tmp_path / "notes").mkdir()  # no metrics.jsonl: not a run

    comparison_path, curves_path = compare_runs(tmp_path)

    comparison = comparison_path.read_text()
    assert comparison_path.parent == tmp_path and curves_path.parent == tmp_path
    flora_line = next(line for line in comparison.splitlines() if line.startswith("| flora "))
    assert "1.8000" in flora_line and "1.5000" in flora_line  # final, best
    assert "40.00%" in flora_line
    assert "3.00 KiB" not in flora_line and "2.93 KiB" in flora_line  # 1000 + 2000 bytes up
    assert "6.00 MiB" in flora_line
    baseline_line = next(line for line in comparison.splitlines() if line.startswith("| baseline "))
    assert "fedavg" in baseline_line and "2.2000" in baseline_line
    assert "notes" not in comparison
    assert_png(curves_path)


def test_compare_runs_without_runs_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="metrics.jsonl"):
        compare_runs(tmp_path)


def test_console_table_has_a_row_per_round():
    rows = fake_rows("flora", [2.5, 2.0], mmlu={1: 0.3})
    table = console_table([RoundRow.from_json(row) for row in rows], title="flora")
    assert table.row_count == 2
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "2.5000" in text and "30.00%" in text and "—" in text
