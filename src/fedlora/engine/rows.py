"""One round's metrics: the typed row the round loop makes and reports, reports and sweeps read,
and ``metrics.jsonl`` holds one JSON object of per round (flat; a measurement not made that
round is absent; the method's own diagnostics sit beside the rest)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.engine.metrics import read_metrics, rewrite_metrics

#: measurements a round may not make: absent from its JSON when not made
_OPTIONAL = ("aggregation_error", "broadcast_error", "eval_loss", "perplexity", "eval_tokens", "val_loss",
             "mmlu_acc", "mmlu_correct", "mmlu_total", "mmlu_per_subject", "rouge_l", "exact_match",
             "generation_n", "generated_tokens", "sample_generation", "tasks", "per_client", "privacy",
             "client_privacy")


@dataclass
class RoundRow:
    """What one round did and cost, and how the model it left evaluated (round 0: the start)."""

    round: int
    method: str
    #: the clients whose updates were aggregated, in task order
    clients: list[str] = field(default_factory=list)
    #: their mean training loss, example-weighted; None where none reported one (DP-SGD)
    train_loss: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    params_up: int = 0
    params_down: int = 0
    client_seconds: float = 0.0
    server_seconds: float = 0.0
    eval_seconds: float = 0.0
    seconds: float = 0.0
    #: updates refused (client, module, rule, reason) and clients that did not reply
    rejected: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    #: too few usable updates: the global model was kept
    skipped: bool = False
    #: ‖Δ_global − Σ p_k Δ_k‖ / ‖Σ p_k Δ_k‖ and what clients are sent against the global adapter
    #: (fedlora.aggregation.error); absent for a personalised method
    aggregation_error: float | None = None
    broadcast_error: float | None = None
    # evaluation: of the global model, or the mean of the clients' own models (each in per_client)
    eval_loss: float | None = None
    perplexity: float | None = None
    eval_tokens: int | None = None
    val_loss: float | None = None
    mmlu_acc: float | None = None
    mmlu_correct: int | None = None
    mmlu_total: int | None = None
    mmlu_per_subject: dict | None = None
    #: greedy answers to held-out prompts (fedlora.eval.generation): mean ROUGE-L F and exact
    #: match over ``generation_n`` prompts, the tokens generated, the first prompt answered
    rouge_l: float | None = None
    exact_match: float | None = None
    generation_n: int | None = None
    generated_tokens: int | None = None
    sample_generation: dict | None = None
    #: lm-evaluation-harness results: {task: {metric: value, "<metric>_stderr": …, "n": documents}}
    tasks: dict | None = None
    per_client: dict | None = None
    #: each client's (ε, δ) so far: sample-level (DP-SGD) and client-level (DP-FedAvg)
    privacy: dict | None = None
    client_privacy: dict | None = None
    #: the method's diagnostics (broadcast_rank, truncation_error, …) and any other measurement
    extra: dict[str, Any] = field(default_factory=dict)

    def measured(self, metrics: dict[str, Any]) -> None:
        """Take in a dict of measurements (an evaluation's, privacy's, a method's info)."""
        for key, value in metrics.items():
            if key in _FIELDS and key != "extra":
                setattr(self, key, value)
            else:
                self.extra[key] = value

    def to_json(self) -> dict[str, Any]:
        values = {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self) if spec.name != "extra"}
        return {**{key: value for key, value in values.items() if value is not None or key not in _OPTIONAL},
                **self.extra}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RoundRow:
        row = cls(round=values["round"], method=values.get("method", ""))
        row.measured({key: value for key, value in values.items() if key not in ("round", "method")})
        return row


_FIELDS = frozenset(spec.name for spec in dataclasses.fields(RoundRow))


def read_rows(run_dir: Path | str) -> list[RoundRow]:
    """A run folder's rows (:func:`fedlora.engine.metrics.read_metrics`), typed."""
    return [RoundRow.from_json(values) for values in read_metrics(run_dir)]


class RoundLog(list[RoundRow]):
    """A run's rows so far: a part of its checkpointed state, so a resumed run's ``metrics.jsonl``
    holds its checkpoint's rows again."""

    def __init__(self, run_dir: Path | str):
        super().__init__()
        self.run_dir = Path(run_dir)

    def state_dict(self) -> tuple[dict, dict]:
        return {"rows": [row.to_json() for row in self]}, {}

    def load_state_dict(self, state: tuple[dict, dict]) -> None:
        self[:] = [RoundRow.from_json(row) for row in state[0]["rows"]]
        rewrite_metrics(self.run_dir, state[0]["rows"])  # rows written after the checkpoint are redone
