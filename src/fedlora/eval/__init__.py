"""Evaluation of a model: held-out loss/perplexity, MMLU log-likelihood accuracy, and generation
scored with ROUGE-L (lm-evaluation-harness tasks: :mod:`fedlora.eval.harness`, imported lazily)."""

from fedlora.eval.generation import evaluate_generation
from fedlora.eval.loss import evaluate_loss, evaluate_loss_tokenized
from fedlora.eval.mmlu import answer_log_likelihoods, evaluate_mmlu

__all__ = ["answer_log_likelihoods", "evaluate_generation", "evaluate_loss", "evaluate_loss_tokenized",
           "evaluate_mmlu"]
