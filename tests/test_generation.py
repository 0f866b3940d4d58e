"""Generation quality: held-out prompts, greedy batched generation, ROUGE-L and exact match, in a
run's rows, its report and its curves."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from rouge_score import rouge_scorer

from fedlora.data import Conversation, Message, Record, generation_prompts, tokenize_record
from fedlora.data.prompts import generation_prompt
from fedlora.engine.evaluator import Cadence
from fedlora.eval.generation import evaluate_generation, exact_match, generate, rouge_l
from fedlora.models import load_model
from fedlora.report import write_report

from support import byte_tokenizer, run_tiny, write_clients


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny-llama", device="cpu", dtype="float32", seed=0)
    return model.double(), tokenizer  # float64: no near-tie of two tokens flips with the batch


def test_rouge_l_is_the_longest_common_subsequence_f_measure():
    # "the cat sat on the mat" vs "the cat on the mat": LCS 5 tokens; P = 5/5, R = 5/6
    prediction, reference = "the cat on the mat", "the cat sat on the mat"
    precision, recall = 5 / 5, 5 / 6
    assert rouge_l([prediction], [reference]) == pytest.approx(2 * precision * recall / (precision + recall))
    # the mean over pairs, as rouge-score scores each (stemmed: "running" and "runs" share "run")
    pairs = [("a dog running fast", "the dog runs fast"), ("nothing alike", "completely different words"),
             ("same words", "same words")]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs) / 3
    assert rouge_l(*zip(*pairs)) == pytest.approx(expected)
    assert 0 < expected < 1 and rouge_l(["same words"], ["same words"]) == 1.0


def test_exact_match_ignores_case_and_whitespace_only():
    assert exact_match(["Paris ", "the  Cat", "Rome."], ["paris", "The cat", "Rome"]) == pytest.approx(2 / 3)


def test_a_prompt_is_the_record_as_training_renders_it_up_to_its_answer(tiny):
    _, tokenizer = tiny
    record = Record("Name a colour.", "", "Red.")
    prompt = generation_prompt(tokenizer, record, 512)
    example = tokenize_record(tokenizer, record, 512)
    answer_start = example.labels.index(next(label for label in example.labels if label != -100))
    assert prompt.prompt_ids == example.input_ids[:answer_start] and prompt.reference == "Red."
    assert tokenizer.decode(prompt.prompt_ids, skip_special_tokens=True).endswith("### Response:\n")
    # a prompt longer than max_length is passed over, and counted
    long = Record("x " * 300, "", "y")
    prompts, skipped = generation_prompts(tokenizer, [long, record, record], len(prompt.prompt_ids), limit=1)
    assert skipped == 1 and [p.reference for p in prompts] == ["Red."]


def test_a_conversation_is_asked_its_last_assistant_turn():

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    conversation = Conversation((Message("user", "Hi"), Message("assistant", "Hello"),
                                 Message("user", "Colour?"), Message("assistant", "Blue")))
    prompt = generation_prompt(tokenizer, conversation, 512, prompt_format="chat")
    assert prompt.reference == "Blue"
    assert tokenizer.decode(prompt.prompt_ids, skip_special_tokens=True) == \
        "<user>Hi<assistant>Hello<user>Colour?<assistant>"


def test_batched_left_padded_generation_answers_as_each_prompt_alone(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer(text)["input_ids"] for text in ("Hello", "A much longer prompt here", "Mid length")]
    batched, tokens = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate(model, tokenizer, [prompt], max_new_tokens=6)[0][0] for prompt in prompts]
    assert batched == alone and tokens == 3 * 6  # a random model never says EOS: every answer is full length


def test_an_answer_stops_at_eos(tiny):
    model, tokenizer = tiny
    prompt = tokenizer("Hello")["input_ids"]
    with torch.no_grad():
        first = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
    stopping = copy.deepcopy(tokenizer)
    stopping.eos_token = tokenizer.convert_ids_to_tokens(first)  # the first greedy token ends the answer
    answers, tokens = generate(model, stopping, [prompt], max_new_tokens=6)
    assert tokens == 1 and answers == [""]


def test_evaluate_generation_scores_every_prompt_and_keeps_the_first(tiny):
    model, tokenizer = tiny
    prompts, _ = generation_prompts(tokenizer, [Record("Say hi.", "", "hi"), Record("Say no.", "", "no")], 512, 2)
    done = []
    metrics = evaluate_generation(model, tokenizer, prompts, max_new_tokens=4, batch_size=1, progress=done.append)
    answers, _ = generate(model, tokenizer, [p.prompt_ids for p in prompts], max_new_tokens=4)
    assert metrics["rouge_l"] == pytest.approx(rouge_l(answers, ["hi", "no"]))
    assert metrics["generation_n"] == 2 and metrics["generated_tokens"] == 8 and done == [1, 2]
    assert metrics["sample_generation"]["answer"] == answers[0]
    assert metrics["sample_generation"]["reference"] == "hi"


def test_cadence_runs_on_the_final_round_round_0_when_asked_and_every_k():
    assert [r for r in range(7) if Cadence().due(r, 6)] == [6]
    assert [r for r in range(7) if Cadence(at_start=True).due(r, 6)] == [0, 6]
    assert [r for r in range(7) if Cadence(4).due(r, 6)] == [0, 4, 6]


def test_a_run_generates_before_and_after_training_and_reports_it(tmp_path):
    client_dir = write_clients(tmp_path / "clients")
    # max_length fits the Alpaca prompts of the test records (byte tokens)
    rows = run_tiny(client_dir, tmp_path / "run", rounds=3, generation_every=2, max_length=256)
    generated = [row["round"] for row in rows if "rouge_l" in row]
    assert generated == [0, 2, 3]
    for row in rows:
        if "rouge_l" in row:
            assert 0 <= row["rouge_l"] <= 1 and row["generation_n"] == 2 and row["generated_tokens"] > 0
            assert set(row["sample_generation"]) == {"prompt", "reference", "answer"}
    test_records = json.loads((client_dir / "global_test.json").read_text())
    assert rows[0]["sample_generation"]["reference"] == test_records[0]["response"]
    report = write_report(tmp_path / "run")[0].read_text()
    assert "rouge_l" in report and "exact_match" in report
    first_answer = " ".join(rows[0]["sample_generation"]["answer"].split())
    assert f"answer, round 0: {first_answer}" in report and "answer, round 3:" in report
