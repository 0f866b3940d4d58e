"""lm-evaluation-harness on the model in memory: fedlora's offline tasks, parity with fedlora's own
MMLU scoring and generation, the base weights untouched, and one-line errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.data import Record, generation_prompts, load_mmlu
from fedlora.data.mmlu import LETTERS
from fedlora.engine.config import ConfigError, build_config
from fedlora.engine.evaluator import Cadence, Evaluator
from fedlora.engine.global_model import GlobalModel
from fedlora.eval.generation import evaluate_generation
from fedlora.eval.harness import TaskDataMissing, run_tasks
from fedlora.eval.mmlu import LETTER_DELIMITERS, answer_log_likelihoods, answer_tokens, mmlu_context
from fedlora.aggregation import LoraFactors
from fedlora.lora.merge import base_weight
from fedlora.models import load_model
from fedlora.report import write_report

from support import MMLU, require_shared_data, run_tiny, write_clients

QUESTIONS = 60


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny-llama", device="cpu", dtype="float32", seed=0)
    return model.double(), tokenizer  # float64: no near-tie of two letters flips between the two scorers


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    """A tiny local MMLU file in FLoRA's format: the first questions of the shared one."""
    require_shared_data()
    local = tmp_path_factory.mktemp("mmlu") / "mmlu_small.json"
    local.write_text(json.dumps(json.loads(MMLU.read_text())[:QUESTIONS]))
    return load_mmlu(local)


@pytest.fixture(scope="module")
def harness(tiny, questions):
    """One lm-eval run of both fedlora tasks, with its per-document records."""
    model, tokenizer = tiny
    records = [Record(f"Name colour number {i}.", "", ["red", "green", "blue"][i % 3]) for i in range(4)]
    prompts, _ = generation_prompts(tokenizer, records, 512, limit=4)
    results = run_tasks(model, tokenizer, ["fedlora_mmlu", "fedlora_generation"], questions=questions,
                        prompts=prompts, max_new_tokens=6, samples=True)
    return results, prompts


@pytest.mark.slow
def test_lm_eval_chooses_the_letter_fedloras_fast_scoring_chooses_for_every_question(tiny, questions, harness):
    model, tokenizer = tiny
    results, _ = harness
    fast = [LETTERS[i] for i in answer_log_likelihoods(model, tokenizer, questions).argmax(dim=-1).tolist()]
    chosen = {}
    for sample in results["samples"]["fedlora_mmlu"]:
        likelihoods = [response[0] for response in sample["filtered_resps"]]
        chosen[sample["doc_id"]] = LETTERS[max(range(len(LETTERS)), key=likelihoods.__getitem__)]
    assert len(chosen) == QUESTIONS >= 50
    assert [chosen[i] for i in range(QUESTIONS)] == fast
    correct = sum(letter == q.answer for letter, q in zip(fast, questions))
    assert results["fedlora_mmlu"]["acc"] == pytest.approx(correct / QUESTIONS)
    assert results["fedlora_mmlu"]["n"] == QUESTIONS and results["fedlora_mmlu"]["acc_stderr"] > 0


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.slow
def test_in_the_chat_format_both_score_the_first_token_of_the_assistants_answer(tiny, questions):
    model, tokenizer = tiny
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    context = mmlu_context(chat, questions[0], "chat")
    assert context.startswith("<user>The following is a multiple choice question") and context.endswith(
        "Answer:</s><assistant>")
    form = answer_tokens(chat, context, LETTER_DELIMITERS["chat"], "chat")
    assert form.prompt_suffix == "" and form.letter_ids == tuple(chat.convert_tokens_to_ids(list("ABCD")))
    fast = answer_log_likelihoods(model, chat, questions, prompt_format="chat").argmax(dim=-1).tolist()
    results = run_tasks(model, chat, ["fedlora_mmlu"], questions=questions, prompt_format="chat", samples=True)
    chosen = {}
    for sample in results["samples"]["fedlora_mmlu"]:
        likelihoods = [response[0] for response in sample["filtered_resps"]]
        chosen[sample["doc_id"]] = max(range(len(LETTERS)), key=likelihoods.__getitem__)
    assert [chosen[i] for i in range(QUESTIONS)] == fast
    # the template changed what the model is asked: not the plain prompt's scores
    assert not torch.equal(answer_log_likelihoods(model, chat, questions[:4], prompt_format="chat"),
                           answer_log_likelihoods(model, chat, questions[:4]))


@pytest.mark.slow
def test_lm_eval_generation_scores_what_fedlora_generates(tiny, harness):
    model, tokenizer = tiny
    results, prompts = harness
    ours = evaluate_generation(model, tokenizer, prompts, max_new_tokens=6)
    assert results["fedlora_generation"]["n"] == 4
    assert results["fedlora_generation"]["rouge_l"] == pytest.approx(ours["rouge_l"])
    assert results["fedlora_generation"]["exact_match"] == pytest.approx(ours["exact_match"])


@pytest.mark.slow
def test_tasks_see_the_global_adapter_and_leave_the_base_weights_bit_identical(tiny, questions):
    model, tokenizer = tiny
    modules = ["model.layers.0.self_attn.q_proj"]
    global_model = GlobalModel(model, modules)
    before = base_weight(model, modules[0]).clone()
    d, n = before.shape
    generator = torch.Generator().manual_seed(0)
    adapter = {modules[0]: LoraFactors(torch.randn(4, n, generator=generator, dtype=torch.float64),
                                       torch.randn(d, 4, generator=generator, dtype=torch.float64), 1.0)}
    evaluator = Evaluator(tokenizer, 0, final_round=1, questions=questions[:8], tasks=("fedlora_mmlu",),
                          cadences={"test": Cadence(), "validation": Cadence(), "mmlu": Cadence(),
                                    "generation": Cadence(), "tasks": Cadence()})
    with global_model.with_adapter(adapter) as adapted:
        with_adapter = evaluator(adapted, 1)
    without = evaluator(model, 1)
    assert torch.equal(base_weight(model, modules[0]), before)
    # the adapter was evaluated: the letters' likelihoods moved
    assert with_adapter["tasks"]["fedlora_mmlu"]["acc"] != without["tasks"]["fedlora_mmlu"]["acc"] or \
        with_adapter["mmlu_acc"] != without["mmlu_acc"]


@pytest.mark.slow
def test_each_run_scores_its_own_documents_though_the_task_index_is_built_once(tiny, questions):
    model, tokenizer = tiny
    first = run_tasks(model, tokenizer, ["fedlora_mmlu"], questions=questions[:3], samples=True)
    second = run_tasks(model, tokenizer, ["fedlora_mmlu"], questions=questions[3:8], samples=True)
    assert first["fedlora_mmlu"]["n"] == 3 and second["fedlora_mmlu"]["n"] == 5
    assert [sample["doc"]["answer"] for sample in second["samples"]["fedlora_mmlu"]] == [
        LETTERS.index(question.answer) for question in questions[3:8]]


@pytest.mark.slow
def test_a_task_whose_data_is_not_available_offline_is_one_line_naming_it(tiny):
    model, tokenizer = tiny
    with pytest.raises(TaskDataMissing) as missing:
        run_tasks(model, tokenizer, ["arc_easy"], limit=2)
    assert "arc_easy" in str(missing.value) and "offline" in str(missing.value) and "\n" not in str(missing.value)
    with pytest.raises(TaskDataMissing, match="knows no task 'no_such_task'"):
        run_tasks(model, tokenizer, ["no_such_task"])


def test_fedloras_tasks_need_their_inputs_in_the_configuration():
    with pytest.raises(ConfigError, match="'fedlora_mmlu'.*'mmlu' file"):
        build_config({"eval_tasks": "fedlora_mmlu"})
    with pytest.raises(ConfigError, match="'generation_limit'"):
        build_config({"eval_tasks": ["fedlora_generation"], "generation_limit": 0})


@pytest.mark.slow
def test_a_run_runs_tasks_on_its_last_round_and_fedlora_eval_runs_them_on_its_model(tmp_path):
    require_shared_data()  # `fedlora eval --mmlu` reads the shared MMLU file
    client_dir = write_clients(tmp_path / "clients")
    rows = run_tiny(client_dir, tmp_path / "run", max_length=256, eval_tasks=["fedlora_generation"])
    assert [row["round"] for row in rows if "tasks" in row] == [2]
    scores = rows[-1]["tasks"]["fedlora_generation"]
    assert scores["n"] == 2 and scores["rouge_l"] == pytest.approx(rows[-1]["rouge_l"])
    report = write_report(tmp_path / "run")[0].read_text()
    assert "fedlora_generation/rouge_l" in report and "fedlora_generation/exact_match" in report

    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--tasks", "fedlora_generation",
                                      "--mmlu", str(MMLU), "--mmlu-limit", "4"], terminal_width=200)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["round"] == 2 and printed["tasks"]["fedlora_generation"]["rouge_l"] == pytest.approx(scores["rouge_l"])
    assert printed["mmlu_total"] == 4 and "eval_loss" in printed
    failed = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--tasks", "no_such_task"])
    errors = [line for line in failed.output.splitlines() if line.startswith("error:")]
    assert failed.exit_code == 2 and failed.output.rstrip().splitlines()[-1] == errors[0]
    assert len(errors) == 1 and "no_such_task" in errors[0]
