"""Per-round evaluation of the global model: each measurement on the rounds its cadence names."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fedlora.data import (AnyRecord, GenerationPrompt, MMLUQuestion, TokenizedExample, generation_prompts, load_mmlu,
                          load_records, tokenize_records)
from fedlora.engine.config import RunConfig
from fedlora.eval import evaluate_generation, evaluate_loss_tokenized, evaluate_mmlu

#: what an evaluation measures, in the order it measures them
MEASUREMENTS = ("test", "validation", "mmlu", "generation", "tasks")
#: progress of a long measurement: (what, done, total)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Cadence:
    """The rounds a measurement runs on: the final round, round 0 where ``at_start``, and every
    ``every`` rounds (round 0 included) where ``every`` is set."""

    every: int = 0
    at_start: bool = False

    def due(self, server_round: int, final_round: int) -> bool:
        return (server_round == final_round or (self.at_start and server_round == 0)
                or bool(self.every and server_round % self.every == 0))


@dataclass(frozen=True)
class Evaluator:
    """Evaluates with its held-out inputs prepared once, since the same sets are scored every round.

    The test loss and generation run on round 0 too (the model before training); the validation
    loss, MMLU and lm-eval tasks, which tuning or a final report read, on the final round.
    With ``deferred`` the test loss and generation run on round 0 alone: a sweep scores the last
    round's on the runs tuning chose only, afterwards.
    """

    tokenizer: Any
    pad_token_id: int
    final_round: int
    test_examples: Sequence[TokenizedExample] = ()
    #: records held out of the clients' training (val_loss); what tuning may look at
    validation_examples: Sequence[TokenizedExample] = ()
    questions: Sequence[MMLUQuestion] = ()
    generation_prompts: Sequence[GenerationPrompt] = ()
    #: lm-evaluation-harness task names (fedlora.eval.harness)
    tasks: Sequence[str] = ()
    cadences: dict[str, Cadence] = field(default_factory=lambda: {
        "test": Cadence(1, at_start=True), "validation": Cadence(), "mmlu": Cadence(),
        "generation": Cadence(at_start=True), "tasks": Cadence()})
    batch_size: int = 8
    max_new_tokens: int = 64
    tasks_limit: int | None = None
    #: the run's prompt format: MMLU's and lm-eval's prompts are rendered in it
    prompt_format: str = "alpaca"
    #: batches packed in one row (the model computes them apart)
    packed: bool = False
    deferred: bool = False
    progress: Progress | None = None

    def _has_inputs(self, measurement: str) -> bool:
        return bool({"test": self.test_examples, "validation": self.validation_examples, "mmlu": self.questions,
                     "generation": self.generation_prompts, "tasks": self.tasks}[measurement])

    def due(self, server_round: int) -> tuple[str, ...]:
        """The measurements this evaluator makes in ``server_round``."""
        def deferred_away(measurement: str) -> bool:
            return self.deferred and server_round > 0 and measurement in ("test", "generation")
        return tuple(m for m in MEASUREMENTS if self._has_inputs(m) and not deferred_away(m)
                     and self.cadences[m].due(server_round, self.final_round))

    def _progress(self, what: str, total: int) -> Callable[[int], None] | None:
        return None if self.progress is None else (lambda done: self.progress(what, done, total))

    def __call__(self, model: nn.Module, server_round: int) -> dict:
        return self.measure(model, self.due(server_round))

    def measure(self, model: nn.Module, due: Sequence[str]) -> dict:
        """The measurements ``due`` (of :data:`MEASUREMENTS`) of ``model``."""
        metrics: dict = {}
        if "test" in due:
            metrics.update(evaluate_loss_tokenized(model, self.test_examples, self.pad_token_id,
                                                   batch_size=self.batch_size, packed=self.packed))
        if "validation" in due:
            metrics["val_loss"] = evaluate_loss_tokenized(model, self.validation_examples, self.pad_token_id,
                                                          batch_size=self.batch_size, packed=self.packed)["eval_loss"]
        if "mmlu" in due:
            metrics.update(evaluate_mmlu(model, self.tokenizer, self.questions, prompt_format=self.prompt_format,
                                         batch_size=self.batch_size, packed=self.packed,
                                         progress=self._progress("MMLU", len(self.questions))))
        if "generation" in due:
            metrics.update(evaluate_generation(model, self.tokenizer, self.generation_prompts,
                                               max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                               progress=self._progress("generation", len(self.generation_prompts))))
        if "tasks" in due:
            from fedlora.eval.harness import run_tasks  # lm-eval: imported only when a task runs

            metrics["tasks"] = run_tasks(model, self.tokenizer, self.tasks, questions=self.questions,
                                         prompts=self.generation_prompts, prompt_format=self.prompt_format,
                                         batch_size=self.batch_size,
                                         max_new_tokens=self.max_new_tokens, limit=self.tasks_limit)
        return metrics


def evaluation_inputs(config: RunConfig) -> tuple[list[AnyRecord], list[MMLUQuestion]]:
    """The run's held-out records and MMLU questions, as its configuration limits them."""
    test_records = load_records(config.test_data) if config.test_data else []
    questions = load_mmlu(config.mmlu, limit=config.mmlu_limit) if config.mmlu else []
    return test_records, questions


def run_evaluator(config: RunConfig, tokenizer, pad_token_id: int, test_records: Sequence[AnyRecord],
                  questions: Sequence[MMLUQuestion], *, prompt_format: str,
                  log: Callable[[str], None] = lambda message: None, progress: Progress | None = None,
                  validation_records: Sequence[AnyRecord] = (), packed: bool = False,
                  final_round: int | None = None) -> Evaluator:
    """The run's evaluator (the server's, a Flower node's evaluating its client's own model, and
    ``fedlora eval``'s at ``final_round``); its held-out records are tokenised in
    ``prompt_format``, as the clients' training records. The test loss reads the first
    ``test_limit`` test records, generation the first ``generation_limit`` whose prompts fit."""
    test_examples, stats = tokenize_records(tokenizer, test_records[:config.test_limit], config.max_length,
                                            prompt_format=prompt_format)
    if stats.truncated:
        dropped = f", {stats.dropped_turns} whole turns dropped" if stats.dropped_turns else ""
        log(f"{stats.truncated} of {stats.examples} test records truncated to max_length {config.max_length}{dropped}")
    validation_examples, _ = tokenize_records(tokenizer, validation_records, config.max_length,
                                              prompt_format=prompt_format)
    prompts, too_long = generation_prompts(tokenizer, test_records, config.max_length, config.generation_limit,
                                           prompt_format=prompt_format)
    if too_long:
        log(f"generation: {too_long} test records passed over, their prompts longer than max_length "
            f"{config.max_length}")
    if config.generation_limit and len(prompts) < config.generation_limit:
        log(f"generation: {len(prompts)} test records to answer, fewer than generation_limit "
            f"{config.generation_limit}")
    cadences = {"test": Cadence(config.eval_every, at_start=True), "validation": Cadence(config.val_every),
                "mmlu": Cadence(config.mmlu_every), "generation": Cadence(config.generation_every, at_start=True),
                "tasks": Cadence(config.tasks_every)}
    return Evaluator(tokenizer, pad_token_id, config.rounds if final_round is None else final_round,
                     test_examples=test_examples, validation_examples=validation_examples, questions=questions,
                     generation_prompts=prompts, tasks=tuple(config.eval_tasks), cadences=cadences,
                     batch_size=config.eval_batch_size, max_new_tokens=config.max_new_tokens,
                     tasks_limit=config.tasks_limit, prompt_format=prompt_format, packed=packed, progress=progress)
