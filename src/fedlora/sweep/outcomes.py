"""What a finished run folder of a sweep says: its losses per round, communication and MMLU."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.engine.config import CONFIG_FILE, KEYS_BEFORE_THEY_EXISTED
from fedlora.engine.metrics import read_summary
from fedlora.engine.rows import RoundRow, read_rows

#: MMLU scored on a chosen run after tuning (``[final]`` of the sweep file)
FINAL_MMLU_FILE = "final-mmlu.json"
#: the last round's test loss of a chosen run, scored after tuning (``[tune] test = "chosen"``)
FINAL_TEST_FILE = "final-test.json"


def is_finished(run_dir: Path) -> bool:
    """A run is finished once its summary is written, which happens after its last round."""
    return bool(read_summary(run_dir))


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_final_mmlu(run_dir: Path) -> dict | None:
    return _read_json(Path(run_dir) / FINAL_MMLU_FILE)


def read_final_test(run_dir: Path) -> dict | None:
    return _read_json(Path(run_dir) / FINAL_TEST_FILE)


@dataclass(frozen=True)
class RunOutcome:
    rows: list[RoundRow]
    summary: dict
    final_mmlu: dict | None
    #: the test loss of round ``final_test["round"]``, scored after the run (None: in the run, if at all)
    final_test: dict | None = None
    #: its saved configuration's values, a key it predates at the value it was made with
    config: dict = field(default_factory=dict)

    @classmethod
    def read(cls, run_dir: Path) -> RunOutcome:
        config = {**KEYS_BEFORE_THEY_EXISTED, **(_read_json(Path(run_dir) / CONFIG_FILE) or {})}
        return cls(read_rows(run_dir), read_summary(run_dir), read_final_mmlu(run_dir), read_final_test(run_dir),
                   config)

    @property
    def final_val_loss(self) -> float | None:
        return self.rows[-1].val_loss

    def test_losses(self) -> list[float | None]:
        """The test loss of every round, round 0 (the untrained model) first; a round scored
        after the run (:data:`FINAL_TEST_FILE`) has that loss."""
        later = self.final_test or {}
        return [later["eval_loss"] if row.round == later.get("round") else row.eval_loss for row in self.rows]

    @property
    def final_test_loss(self) -> float | None:
        return self.test_losses()[-1]

    @property
    def final_rouge_l(self) -> float | None:
        """The final model's ROUGE-L on the held-out prompts: scored after the run
        (:data:`FINAL_TEST_FILE`) where the sweep deferred it, else in its last round."""
        later = self.final_test or {}
        if later.get("round") == self.rows[-1].round and "rouge_l" in later:
            return later["rouge_l"]
        return self.rows[-1].rouge_l

    @property
    def best_test_loss(self) -> float | None:
        """Best over the trained rounds (round 0 is the same untrained model for every method)."""
        losses = [loss for loss in self.test_losses()[1:] if loss is not None and not math.isnan(loss)]
        return min(losses, default=None)

    def mean_over_rounds(self, key: str) -> float | None:
        """The mean of ``key`` over the trained rounds that report it (``aggregation_error``,
        ``broadcast_error``); None where none does (a personalised method)."""
        values = [getattr(row, key) for row in self.rows[1:] if getattr(row, key) is not None]
        return sum(values) / len(values) if values else None

    def method_measures(self) -> dict[str, float]:
        """Each number the method reported in its rows' info (FLoRA-AdaLoRA's ``ranks_sent`` and
        ``flora_ranks``, flora-warm's ``energy_outside_shared_rank``, …), mean over the trained
        rounds that report it."""
        values: dict[str, list[float]] = {}
        for row in self.rows[1:]:
            for key, value in row.extra.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    values.setdefault(key, []).append(value)
        return {key: sum(numbers) / len(numbers) for key, numbers in values.items()}

    def mmlu(self, question_set: dict | None) -> tuple[float, int] | None:
        """(correct answers, questions): the final MMLU scored on ``question_set`` (the sweep's
        ``[final]``), or without one the last round's."""
        if question_set is not None:
            final = self.final_mmlu or {}
            scored = final if all(final.get(key) == value for key, value in question_set.items()) else None
        else:
            row = next((row for row in reversed(self.rows) if row.mmlu_total), None)
            scored = {"mmlu_acc": row.mmlu_acc, "mmlu_total": row.mmlu_total} if row else None
        if not scored:
            return None
        # the local baseline's accuracy is the mean over the clients' models: its count need not be whole
        return scored["mmlu_acc"] * scored["mmlu_total"], scored["mmlu_total"]

    def communication(self) -> dict:
        return self.summary.get("communication", {})
