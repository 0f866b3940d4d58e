"""Per-round evaluation of the global model: held-out loss every round, MMLU when due."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from fedlora.data import MMLUQuestion, TokenizedExample
from fedlora.eval import evaluate_loss_tokenized, evaluate_mmlu


class Evaluator:
    """Evaluates with test examples tokenised once, since the same set is scored every round.

    MMLU costs ~0.4 s a question on a small CPU model, so it runs on the final round and every
    ``mmlu_every`` rounds (round 0 included) when that is set.
    """

    def __init__(self, tokenizer, pad_token_id: int, test_examples: Sequence[TokenizedExample],
                 questions: Sequence[MMLUQuestion], *, final_round: int, mmlu_every: int = 0,
                 batch_size: int = 8, mmlu_progress: Callable[[int, int], None] | None = None,
                 packed: bool = False):
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.test_examples = test_examples
        self.questions = questions
        self.final_round = final_round
        self.mmlu_every = mmlu_every
        self.batch_size = batch_size
        self.mmlu_progress = mmlu_progress
        self.packed = packed  # batches packed in one row (the model computes them apart)

    def mmlu_due(self, server_round: int) -> bool:
        if not self.questions:
            return False
        return server_round == self.final_round or bool(self.mmlu_every and server_round % self.mmlu_every == 0)

    def __call__(self, model: nn.Module, server_round: int) -> dict:
        metrics: dict = {}
        if self.test_examples:
            metrics.update(evaluate_loss_tokenized(model, self.test_examples, self.pad_token_id,
                                                   batch_size=self.batch_size, packed=self.packed))
        if self.mmlu_due(server_round):
            total = len(self.questions)
            progress = (lambda done: self.mmlu_progress(done, total)) if self.mmlu_progress else None
            metrics.update(evaluate_mmlu(model, self.tokenizer, self.questions, batch_size=self.batch_size,
                                         packed=self.packed, progress=progress))
        return metrics
