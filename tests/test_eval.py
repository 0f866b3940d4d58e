"""Held-out loss and MMLU log-likelihood accuracy."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from fedlora.data.mmlu import LETTERS, MMLUQuestion, load_mmlu, mmlu_prompt
from fedlora.data.prompts import IGNORE_INDEX, tokenize_records
from fedlora.data.records import Record, load_records
from fedlora.eval import answer_log_likelihoods, evaluate_loss, evaluate_loss_tokenized, evaluate_mmlu
from fedlora.eval.mmlu import answer_tokens
from fedlora.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MMLU_FILE = DATA / "mmlu" / "mmlu_test_1444.json"
DOLLY_TEST_FILE = DATA / "dolly-10clients" / "global_test.json"

RECORDS = [
    Record("Name a primary colour.", "", "Red.", "open_qa"),
    Record("Summarise the text.", "Cats sleep a lot, often sixteen hours a day.",
           "Cats sleep most of the day.", "summarization"),
    Record("Count to five.", "", "One, two, three, four, five.", "brainstorming"),
    Record("Translate to French.", "Good morning", "Bonjour", "open_qa"),
    Record("What is 2 + 2?", "", "2 + 2 equals 4, a small even number.", "open_qa"),
]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", seed=0, dtype="float32")  # on the default device (CUDA where present)


def questions() -> list[MMLUQuestion]:
    """Questions of different lengths, answers and subjects, so batches need padding."""
    return [
        MMLUQuestion("What is 1 + 1?", ("1", "2", "3", "4"), "B", "arithmetic"),
        MMLUQuestion("Which planet is known as the red planet of the solar system?",
                     ("Venus", "Jupiter", "Mars", "Saturn"), "C", "astronomy"),
        MMLUQuestion("Pick A.", ("a", "b", "c", "d"), "A", "trivia"),
        MMLUQuestion("Which of the following numbers is prime?", ("4", "6", "8", "7"), "D",
                     "arithmetic"),
        MMLUQuestion("A long question " + "about many things, " * 12 + "which is it?",
                     ("this", "that", "neither", "both"), "B", "trivia"),
        MMLUQuestion("Closest star?", ("Sirius", "The Sun", "Vega", "Polaris"), "B", "astronomy"),
        MMLUQuestion("2 * 3?", ("5", "6", "7", "8"), "B", "arithmetic"),
    ]


# --- held-out loss -------------------------------------------------------------------------


def hand_computed_loss(model, tokenizer, records) -> tuple[float, int]:
    """Every example alone (no padding): summed -log p(label) over its labelled tokens / count."""
    examples, _ = tokenize_records(tokenizer, records, 512)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = model(torch.tensor([example.input_ids], device=model.device)).logits[0].double()
            log_probs = logits.log_softmax(dim=-1)
            for position in range(1, len(example.labels)):
                label = example.labels[position]
                if label != IGNORE_INDEX:
                    total -= log_probs[position - 1, label].item()
                    count += 1
    return total / count, count


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_evaluate_loss_equals_hand_computation(tiny, packed):
    model, tokenizer = tiny
    expected_loss, expected_tokens = hand_computed_loss(model, tokenizer, RECORDS)
    result = evaluate_loss(model, tokenizer, RECORDS, batch_size=3, packed=packed)
    assert result["eval_tokens"] == expected_tokens
    assert result["eval_loss"] == pytest.approx(expected_loss, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-5)


def test_evaluate_loss_is_token_weighted_whatever_the_batch_size(tiny):
    model, tokenizer = tiny
    by_batch_size = {size: evaluate_loss(model, tokenizer, RECORDS, batch_size=size)
                     for size in (1, 2, 3, 8)}
    for result in by_batch_size.values():
        assert result["eval_tokens"] == by_batch_size[1]["eval_tokens"]
        assert result["eval_loss"] == pytest.approx(by_batch_size[1]["eval_loss"], abs=1e-5)


def test_evaluate_loss_tokenized_reuses_examples_and_is_deterministic(tiny):
    model, tokenizer = tiny
    examples, _ = tokenize_records(tokenizer, RECORDS, 512)
    first = evaluate_loss_tokenized(model, examples, tokenizer.pad_token_id, batch_size=2)
    again = evaluate_loss_tokenized(model, examples, tokenizer.pad_token_id, batch_size=2)
    assert first == again == evaluate_loss(model, tokenizer, RECORDS, batch_size=2)


@pytest.mark.parametrize("training", [True, False])
def test_evaluation_restores_the_train_mode(tiny, training):
    model, tokenizer = tiny
    model.train(training)
    try:
        evaluate_loss(model, tokenizer, RECORDS[:2])
        assert all(module.training == training for module in model.modules())
        evaluate_mmlu(model, tokenizer, questions()[:2])
        assert all(module.training == training for module in model.modules())
    finally:
        model.eval()


# --- MMLU ----------------------------------------------------------------------------------


def test_mmlu_batched_equals_unbatched(tiny):
    model, tokenizer = tiny
    unbatched = answer_log_likelihoods(model, tokenizer, questions(), batch_size=1)
    batched = answer_log_likelihoods(model, tokenizer, questions(), batch_size=3)
    assert unbatched.shape == (len(questions()), 4)
    torch.testing.assert_close(batched, unbatched, atol=1e-5, rtol=0)
    assert torch.equal(batched.argmax(dim=-1), unbatched.argmax(dim=-1))
    assert (evaluate_mmlu(model, tokenizer, questions(), batch_size=1)
            == evaluate_mmlu(model, tokenizer, questions(), batch_size=4))


def test_mmlu_scores_the_next_token_after_the_prompt(tiny):
    """Each row is exactly log_softmax of the last position of the prompt run alone."""
    model, tokenizer = tiny
    question = questions()[1]
    form = answer_tokens(tokenizer, mmlu_prompt(question))
    ids = tokenizer(form.context(mmlu_prompt(question)))["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids], device=model.device)).logits[0, -1].log_softmax(dim=-1)
    expected = expected[list(form.letter_ids)].cpu()
    scored = answer_log_likelihoods(model, tokenizer, [question])[0]
    torch.testing.assert_close(scored, expected, atol=1e-5, rtol=0)


def test_answer_tokens_byte_level_puts_the_space_in_the_prompt(tiny):
    _, tokenizer = tiny  # byte-level: " A" is two tokens, "A" one
    form = answer_tokens(tokenizer, "Question?\nAnswer:")
    assert form.prompt_suffix == " "
    assert form.letter_ids == tuple(tokenizer.convert_tokens_to_ids(list(LETTERS)))
    assert form.context("Answer: ") == "Answer: "  # a trailing space is never doubled


def test_answer_tokens_prefers_space_letter_tokens():
    """A BPE vocabulary with "ĠA".."ĠD" scores the letter right after "Answer:"."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    merges = [("Ġ", letter) for letter in LETTERS]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="Ċ")

    form = answer_tokens(tokenizer, "Question?\nAnswer:")
    assert form.prompt_suffix == ""
    assert form.letter_ids == tuple(vocab["Ġ" + letter] for letter in LETTERS)


class FavouriteLetterModel(nn.Module):
    """Next-token logits that always put the given letter's token first, at every position."""

    def __init__(self, vocab_size: int, favourite_token: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.vocab_size = vocab_size
        self.favourite_token = favourite_token

    def forward(self, input_ids, attention_mask, logits_to_keep, use_cache):
        # logits_to_keep: transformers' boolean mask of the positions whose logits are returned
        logits = torch.zeros(int(logits_to_keep.sum()), self.vocab_size)
        logits[..., self.favourite_token] = 5.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("favourite", ["A", "B", "D"])
def test_mmlu_accuracy_of_a_model_with_known_answers(tiny, favourite):
    _, tokenizer = tiny
    qs = questions()
    model = FavouriteLetterModel(len(tokenizer), tokenizer.convert_tokens_to_ids(favourite))
    done = []
    result = evaluate_mmlu(model, tokenizer, qs, batch_size=3, progress=done.append)

    expected_correct = sum(q.answer == favourite for q in qs)
    assert result["mmlu_correct"] == expected_correct
    assert result["mmlu_total"] == len(qs)
    assert result["mmlu_acc"] == pytest.approx(expected_correct / len(qs))
    assert done == [3, 6, 7]

    per_subject = result["mmlu_per_subject"]
    assert set(per_subject) == {q.subject for q in qs}
    for subject, entry in per_subject.items():
        in_subject = [q for q in qs if q.subject == subject]
        assert entry["n"] == len(in_subject)
        assert entry["acc"] == pytest.approx(
            sum(q.answer == favourite for q in in_subject) / len(in_subject))
    assert sum(entry["n"] for entry in per_subject.values()) == result["mmlu_total"]
    assert sum(round(entry["acc"] * entry["n"]) for entry in per_subject.values()) \
        == result["mmlu_correct"]


def test_mmlu_without_questions(tiny):
    model, tokenizer = tiny
    result = evaluate_mmlu(model, tokenizer, [])
    assert result["mmlu_total"] == 0 and result["mmlu_per_subject"] == {}
    assert math.isnan(result["mmlu_acc"])


# --- the real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_cache):
    return load_model("smollm2-135m", gguf_cache=smollm2_cache)


@pytest.mark.slow
@pytest.mark.skipif(not MMLU_FILE.is_file(), reason=f"{MMLU_FILE} is absent")
def test_smollm2_mmlu(smollm2):
    model, tokenizer = smollm2
    qs = load_mmlu(MMLU_FILE, limit=20)
    assert answer_tokens(tokenizer, mmlu_prompt(qs[0])).prompt_suffix == ""  # " A" is one token
    result = evaluate_mmlu(model, tokenizer, qs, batch_size=8)
    assert result["mmlu_total"] == 20
    assert 0.0 <= result["mmlu_acc"] <= 1.0


@pytest.mark.slow
@pytest.mark.skipif(not DOLLY_TEST_FILE.is_file(), reason=f"{DOLLY_TEST_FILE} is absent")
def test_smollm2_held_out_loss(smollm2):
    model, tokenizer = smollm2
    records = load_records(DOLLY_TEST_FILE)[:16]
    result = evaluate_loss(model, tokenizer, records, max_length=512, batch_size=8)
    assert result["eval_tokens"] > 0
    assert math.isfinite(result["eval_loss"]) and result["eval_loss"] < 4
