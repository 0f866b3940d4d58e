"""MMLU accuracy by next-token log-likelihood of the answer letter.

Each question's context (:func:`mmlu_context`) goes through the model once; the prediction is
whichever of the letters A–D has the highest log-probability as the very next token. No text
is generated, so a model that would answer in prose is still scored on what it believes, and
the result is deterministic.

The context is the zero-shot prompt (:func:`fedlora.data.mmlu.mmlu_prompt`, ending in
``Answer:``) in the run's prompt format: as it is (``alpaca``), or for a chat model as the
user's turn of its chat template with the assistant's turn opened (``chat``), where the letter
is the first token of the assistant's answer — as lm-evaluation-harness scores a multiple-choice
task with ``apply_chat_template``.

Which token is "the letter" depends on the tokenizer (see :func:`answer_tokens`): after
``Answer:`` a BPE vocabulary such as SmolLM2's has `` A`` (space + letter) as a single token,
which is how the letter follows ``Answer:`` in text, so the model is scored right after
``Answer:``; a byte-level vocabulary splits `` A`` into two tokens, so the space goes into the
prompt and the bare letter is scored. In the chat format the bare letter follows the opened
turn. Prompts of similar lengths share a batch, packed in one row (``packed``, for a
model that computes packed sequences apart) or right-padded, and the LM head is applied only
to each prompt's last position, so batched scores equal unbatched ones. A prompt longer than
the model's context (:func:`fedlora.models.context_length`) loses its start, as
lm-evaluation-harness cuts it, so both score the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedlora.data.batches import token_batch
from fedlora.data.mmlu import LETTERS, MMLUQuestion, mmlu_prompt
from fedlora.data.prompts import IGNORE_INDEX, TokenizedExample
from fedlora.forward import eval_mode
from fedlora.models import ModelError, context_length, model_device, pad_token_id


@dataclass(frozen=True)
class AnswerTokens:
    """How answer letters are scored: the text appended to each prompt, the letters' token ids."""

    #: appended to the prompt (after its trailing spaces are stripped) before it is tokenised
    prompt_suffix: str
    #: the token id of each of A, B, C, D as the next token after the suffixed prompt
    letter_ids: tuple[int, ...]

    def context(self, prompt: str) -> str:
        """The text whose next token is the answer letter."""
        return prompt.rstrip(" ") + self.prompt_suffix


#: what separates the answer letter from the context, by prompt format (lm-eval's target delimiter)
LETTER_DELIMITERS = {"alpaca": " ", "chat": ""}


def mmlu_context(tokenizer, question: MMLUQuestion, prompt_format: str = "alpaca") -> str:
    """The text the answer letter follows: the zero-shot prompt, or for ``chat`` that prompt as
    the user's turn of the tokenizer's chat template, the assistant's turn opened."""
    prompt = mmlu_prompt(question)
    if prompt_format == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def answer_tokens(tokenizer, context: str, delimiter: str = " ", prompt_format: str = "alpaca") -> AnswerTokens:
    """The single-token form of the answer letters after ``context``: ``delimiter`` + letter as
    one token, else (a delimiter that is not one token with the letter) the delimiter moved into
    the context and the bare letter scored; texts tokenised as ``prompt_format`` renders them.

    A form qualifies when, for every letter, tokenising context + letter yields exactly the
    context's tokens plus one more, so the scored position is the one the model continues
    from and no merge across the boundary changes the context.
    """
    base = context.rstrip(" ")
    for prompt_suffix, letter_prefix in [("", delimiter)] + ([(delimiter, "")] if delimiter else []):
        context_ids = encode_context(tokenizer, base + prompt_suffix, prompt_format)
        letter_ids = []
        for letter in LETTERS:
            ids = encode_context(tokenizer, base + prompt_suffix + letter_prefix + letter, prompt_format)
            if len(ids) != len(context_ids) + 1 or ids[:-1] != context_ids:
                break
            letter_ids.append(ids[-1])
        else:
            return AnswerTokens(prompt_suffix, tuple(letter_ids))
    raise ModelError(f"tokenizer {type(tokenizer).__name__} has no single-token form of the "
                     f"answer letters {', '.join(LETTERS)} after the MMLU prompt")


def answer_log_likelihoods(model: nn.Module, tokenizer, questions: Sequence[MMLUQuestion], *,
                           prompt_format: str = "alpaca", batch_size: int = 8, packed: bool = False,
                           progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(len(questions), 4) log-probabilities of A, B, C, D as the next token of each question's
    context in ``prompt_format``.

    ``packed`` needs a model that computes packed sequences apart
    (:func:`fedlora.attention.enable_packing`). ``progress`` is called after every batch with
    the number of questions scored so far.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    scores = torch.empty(len(questions), len(LETTERS))
    if not questions:
        return scores
    prompts = [mmlu_context(tokenizer, question, prompt_format) for question in questions]
    # one form for all: every prompt ends alike
    form = answer_tokens(tokenizer, prompts[0], LETTER_DELIMITERS[prompt_format], prompt_format)
    # the contexts as unlabelled examples: only their last positions are scored; one longer than
    # the model's context loses its start, as lm-evaluation-harness cuts it
    limit = context_length(model)
    contexts = []
    for prompt in prompts:
        ids = encode_context(tokenizer, form.context(prompt), prompt_format)
        kept = ids[-limit:] if limit else ids
        contexts.append(TokenizedExample(kept, [IGNORE_INDEX] * len(kept), truncated=len(kept) < len(ids)))
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    letter_ids = torch.tensor(form.letter_ids, device=device)
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i].input_ids))
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            batch = token_batch([contexts[i] for i in indices], pad_id, packed=packed).to(device)
            last = model(**batch.inputs, logits_to_keep=batch.last_tokens(), use_cache=False).logits.float()
            scores[indices] = last.log_softmax(dim=-1)[:, letter_ids].cpu()
            if progress is not None:
                progress(min(start + batch_size, len(order)))
    return scores


def evaluate_mmlu(model: nn.Module, tokenizer, questions: Sequence[MMLUQuestion], *,
                  prompt_format: str = "alpaca", batch_size: int = 8, packed: bool = False,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Accuracy of the argmax answer letter, overall and per subject.

    Returns ``{"mmlu_acc", "mmlu_correct", "mmlu_total", "mmlu_per_subject"}`` where
    ``mmlu_per_subject`` maps each subject to ``{"acc", "n"}``; ``mmlu_acc`` is NaN when there
    are no questions. Ties go to the earliest letter.
    """
    scores = answer_log_likelihoods(model, tokenizer, questions, prompt_format=prompt_format,
                                    batch_size=batch_size, packed=packed,
                                    progress=progress)
    predictions = [LETTERS[index] for index in scores.argmax(dim=-1).tolist()]
    correct_by_subject: dict[str, list[int]] = {}
    for question, predicted in zip(questions, predictions, strict=True):
        tally = correct_by_subject.setdefault(question.subject, [0, 0])
        tally[0] += int(predicted == question.answer)
        tally[1] += 1
    correct = sum(c for c, _ in correct_by_subject.values())
    total = len(questions)
    return {
        "mmlu_acc": correct / total if total else float("nan"),
        "mmlu_correct": correct,
        "mmlu_total": total,
        "mmlu_per_subject": {subject: {"acc": c / n, "n": n}
                             for subject, (c, n) in sorted(correct_by_subject.items())},
    }


def encode_context(tokenizer, text: str, prompt_format: str = "alpaca") -> list[int]:
    """``text`` tokenised as its format renders it: with the special tokens the tokenizer adds
    (a BOS), or for ``chat`` with those the template wrote into it alone."""
    return tokenizer(text, add_special_tokens=prompt_format != "chat")["input_ids"]

