"""Per-round evaluation of the global model: validation loss every round, test loss and MMLU when due."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fedlora.data import AnyRecord, MMLUQuestion, TokenizedExample, load_mmlu, load_records, tokenize_records
from fedlora.engine.config import RunConfig
from fedlora.eval import evaluate_loss_tokenized, evaluate_mmlu


@dataclass(frozen=True)
class Evaluator:
    """Evaluates with test examples tokenised once, since the same set is scored every round.

    MMLU costs ~0.4 s a question on a small CPU model, so it runs on the final round and every
    ``mmlu_every`` rounds (round 0 included) when that is set. The test loss runs on round 0, the
    final round and every ``eval_every`` rounds: a sweep of many short runs needs only the
    ends. The validation loss runs every ``val_every`` rounds (round 0 included) and on the
    final round; with ``val_every`` 0 on the final round alone, the one tuning reads.
    With ``deferred_test`` the test loss runs on round 0 alone: a sweep scores the last round's
    on the runs tuning chose only, afterwards.
    """

    tokenizer: Any
    pad_token_id: int
    test_examples: Sequence[TokenizedExample]
    questions: Sequence[MMLUQuestion]
    final_round: int
    mmlu_every: int = 0
    eval_every: int = 1
    val_every: int = 1
    batch_size: int = 8
    mmlu_progress: Callable[[int, int], None] | None = None
    #: records held out of the clients' training (val_loss); what tuning may look at
    validation_examples: Sequence[TokenizedExample] = ()
    #: batches packed in one row (the model computes them apart)
    packed: bool = False
    deferred_test: bool = False

    def mmlu_due(self, server_round: int) -> bool:
        if not self.questions:
            return False
        return server_round == self.final_round or bool(self.mmlu_every and server_round % self.mmlu_every == 0)

    def test_due(self, server_round: int) -> bool:
        if not self.test_examples or (self.deferred_test and server_round > 0):
            return False
        return server_round in (0, self.final_round) or server_round % self.eval_every == 0

    def validation_due(self, server_round: int) -> bool:
        if not self.validation_examples:
            return False
        return server_round == self.final_round or bool(self.val_every and server_round % self.val_every == 0)

    def __call__(self, model: nn.Module, server_round: int) -> dict:
        metrics: dict = {}
        if self.test_due(server_round):
            metrics.update(evaluate_loss_tokenized(model, self.test_examples, self.pad_token_id,
                                                   batch_size=self.batch_size, packed=self.packed))
        if self.validation_due(server_round):
            metrics["val_loss"] = evaluate_loss_tokenized(model, self.validation_examples, self.pad_token_id,
                                                          batch_size=self.batch_size, packed=self.packed)["eval_loss"]
        if self.mmlu_due(server_round):
            total = len(self.questions)
            progress = (lambda done: self.mmlu_progress(done, total)) if self.mmlu_progress else None
            metrics.update(evaluate_mmlu(model, self.tokenizer, self.questions, batch_size=self.batch_size,
                                         packed=self.packed, progress=progress))
        return metrics


def evaluation_inputs(config: RunConfig) -> tuple[list[AnyRecord], list[MMLUQuestion]]:
    """The run's held-out records and MMLU questions, as its configuration limits them."""
    test_records = load_records(config.test_data)[:config.test_limit] if config.test_data else []
    questions = load_mmlu(config.mmlu, limit=config.mmlu_limit) if config.mmlu else []
    return test_records, questions


def run_evaluator(config: RunConfig, tokenizer, pad_token_id: int, test_records: Sequence[AnyRecord],
                  questions: Sequence[MMLUQuestion], *, prompt_format: str,
                  log: Callable[[str], None] = lambda message: None,
                  mmlu_progress: Callable[[int, int], None] | None = None,
                  validation_records: Sequence[AnyRecord] = (), packed: bool = False) -> Evaluator:
    """The run's evaluator (the server's, and a Flower node's evaluating its client's own model);
    its held-out records are tokenised in ``prompt_format``, as the clients' training records."""
    test_examples, stats = tokenize_records(tokenizer, test_records, config.max_length, prompt_format=prompt_format)
    if stats.truncated:
        dropped = f", {stats.dropped_turns} whole turns dropped" if stats.dropped_turns else ""
        log(f"{stats.truncated} of {stats.examples} test records truncated to max_length {config.max_length}{dropped}")
    validation_examples, _ = tokenize_records(tokenizer, validation_records, config.max_length,
                                              prompt_format=prompt_format)
    return Evaluator(tokenizer, pad_token_id, test_examples, questions, final_round=config.rounds,
                     mmlu_every=config.mmlu_every, eval_every=config.eval_every, val_every=config.val_every,
                     batch_size=config.eval_batch_size, mmlu_progress=mmlu_progress,
                     validation_examples=validation_examples, packed=packed)
