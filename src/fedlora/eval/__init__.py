"""Evaluation of a model: held-out loss/perplexity and MMLU log-likelihood accuracy."""

from fedlora.eval.loss import evaluate_loss, evaluate_loss_tokenized
from fedlora.eval.mmlu import answer_log_likelihoods, evaluate_mmlu

__all__ = ["answer_log_likelihoods", "evaluate_loss", "evaluate_loss_tokenized", "evaluate_mmlu"]
