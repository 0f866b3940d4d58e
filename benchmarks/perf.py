"""Performance benchmark: fedlora's costs as ratios measured side by side in one run.

(a) client training step at max_length 128 and 512: fedlora's LocalTrainer.train (packed rows,
    LM head only where labels are) ÷ a bare PEFT + torch AdamW loop on the same SmolLM2-135M
    and the same fixed padded batches, interleaved A B A B … to cancel drift: step time, and
    useful (non-pad) tokens per second;
(b) server time per round ÷ client compute per round, from a real in-process FLoRA run of
    SmolLM2 with heterogeneous ranks on the Dolly clients (evaluation reported apart);
(c) peak RSS of K tiny-llama clients in one process, against the base model and K adapters;
(d) held-out loss: fedlora's (packed, logits only where labelled) ÷ the padded full-logits
    computation it replaced, interleaved, and the two values;
(e) MMLU on all 1,444 questions: fedlora's packed scoring and the left-padded scoring it
    replaced, their times and whether every choice is the same;
(f) the `make demo` config over ``--runtime flower`` ÷ in-process: wall time, and whether every
    metric is bit-identical;
(h) CLI start-up: wall time of ``fedlora --help`` and ``fedlora methods``, and which of torch,
    transformers, peft and flwr each imports;
(g) the aggregation table of benchmarks/aggregation.py.

Every measurement runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own.
Run from the repository root: ``make bench-perf``. Writes benchmarks/results/perf.md and prints it;
``--parts demo,cli`` re-measures only those and keeps the other parts' sections as last measured
(benchmarks/results/perf_sections.json), saying so.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import aggregation
from common import DEMO_CONFIG, DOLLY, DOLLY_TEST, HEAVY_MODULES, HEAVY_REPORT, RESULTS, current_rss_mb, \
    dolly_client_files, environment_line, heavy_imports, markdown_table, measure_in_subprocess, peak_rss_mb, \
    pool_dolly, prepare, require_shared_data, run_cli, run_federation, spread, spread_text, timed, \
    timed_mmlu_scoring, write_result

# (a) client training step
STEP_MODEL = "smollm2-135m"
STEP_RANK, STEP_TARGETS, STEP_BATCH, STEP_LR = 16, ("q_proj", "v_proj"), 4, 3e-4
#: max_length → goal of useful tokens per second, fedlora ÷ PEFT
STEP_TOKENS_GOALS = {128: 1.25, 512: 1.8}
STEPS_PER_TRIAL = 10  # of which the last 8 are timed: the padding of the timed batches is what is reported
WARMUP_STEPS = 2  # excluded from every trial: first-call allocations and caches
PAIRS = 3  # timed (fedlora, PEFT) pairs, after one untimed warm-up pair
STEP_GOAL = 1.05

# (b) server ÷ client time, a real FLoRA run
SERVER_RUN = {"model": "smollm2-135m", "data": str(DOLLY), "method": "flora",
              "ranks": [64, 32, 16, 16, 8, 8, 4, 4, 4], "clients_per_round": 3, "local_steps": 3,
              "rounds": 3, "batch_size": 4, "max_length": 128, "test_limit": 16, "generation_limit": 8, "seed": 0}
SERVER_GOAL = 0.05

# (c) memory against the number of clients
MEMORY_CLIENTS = (1, 10, 50, 100)  # each divides MEMORY_STEPS_PER_ROUND
MEMORY_RECORDS = 800  # one pool of Dolly records split among the K clients: the data stays fixed as K grows
# Training steps per round, split evenly among the K clients: the training work stays fixed as K
# grows too, so the K=1 baseline has warmed the same allocator pools and caches as K=100 has.
MEMORY_STEPS_PER_ROUND = 100
MEMORY_RUN = {"model": "tiny-llama", "method": "flora", "ranks": [8], "rounds": 2, "fraction": 1.0,
              "batch_size": 2, "max_length": 64, "seed": 0}
MEMORY_REPEATS = 3  # each K, interleaved: K=1, 10, 50, 100, K=1, 10, …
MODEL_COPIES_ALLOWED = 2

# (d) held-out loss: the run defaults (max_length 256, eval_batch_size 8) on Dolly's test records
HELDOUT_RECORDS, HELDOUT_MAX_LENGTH, HELDOUT_BATCH = 64, 256, 8
HELDOUT_PAIRS = 3  # timed (new, old) pairs, after one untimed warm-up pair
HELDOUT_GOAL = 0.6
HELDOUT_VALUE_GOAL = 1e-6  # relative difference of the two values

# (e) MMLU, every question, with every core (as `fedlora eval` runs it)
MMLU_BATCH = 8
MMLU_GOAL_SECONDS = 180.0

# (f) the demo on both runtimes
DEMO_GOAL = 1.5
DEMO_KEYS = ("round", "eval_loss", "perplexity", "rouge_l", "sample_generation", "train_loss", "bytes_up",
             "bytes_down", "clients")

# (h) CLI start-up: a fresh interpreter per call, as a user's shell starts it
CLI_COMMANDS = (("--help",), ("methods",))
CLI_REPEATS = 5
CLI_GOAL_SECONDS = 1.0

PARTS = ("step", "server", "memory", "heldout", "mmlu", "demo", "cli", "aggregation")


# --- (a) client training step ---------------------------------------------------------------


class StepClock:
    """CPU and wall time at the start and at the end of every optimizer step."""

    def __init__(self):
        self.marks = [(time.process_time(), time.perf_counter())]

    def __call__(self, *_) -> None:
        self.marks.append((time.process_time(), time.perf_counter()))

    def trial(self) -> dict:
        """Mean step time after the warm-up steps, and the whole call (setup and teardown too)."""
        cpu, wall = zip(*self.marks)
        now_cpu, now_wall = time.process_time(), time.perf_counter()
        timed = len(self.marks) - 1 - WARMUP_STEPS
        return {"step_cpu": (cpu[-1] - cpu[WARMUP_STEPS]) / timed,
                "step_wall": (wall[-1] - wall[WARMUP_STEPS]) / timed,
                "call_cpu": now_cpu - cpu[0], "call_wall": now_wall - wall[0]}


def peft_adamw_loop(model, batches, pad_id: int, clock: StepClock):
    """The reference: get_peft_model, torch AdamW over the batches, then unwrap the model."""
    from peft import LoraConfig, TaskType, get_peft_model

    from fedlora.data import collate

    config = LoraConfig(r=STEP_RANK, lora_alpha=2 * STEP_RANK, target_modules=list(STEP_TARGETS),
                        lora_dropout=0.0, bias="none", task_type=TaskType.CAUSAL_LM)
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=STEP_LR)
    peft_model.train()
    for batch in batches:
        peft_model(**collate(batch, pad_id)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock()
    peft_model.eval()
    return peft_model.unload()


def part_step(max_length: int) -> dict:
    from fedlora.attention import enable_packing
    from fedlora.data import load_records, tokenize_records
    from fedlora.engine.client import LocalTrainer, batch_stream
    from fedlora.aggregation import ClientPlan
    from fedlora.engine.task import ClientTask
    from fedlora.models import load_model, pad_token_id

    model, tokenizer = load_model(STEP_MODEL)
    pad_id = pad_token_id(tokenizer)
    records = load_records(dolly_client_files()[0])[:STEPS_PER_TRIAL * STEP_BATCH]
    examples, _ = tokenize_records(tokenizer, records, max_length)
    task = ClientTask(client_id="0", server_round=1, plan=ClientPlan(rank=STEP_RANK), alpha=2 * STEP_RANK,
                      init_seed=0, data_seed=0, local_steps=STEPS_PER_TRIAL)
    # the batches LocalTrainer draws for this task, in its order, given to the reference as a list
    batches = list(itertools.islice(batch_stream(examples, STEP_BATCH, task.data_seed), STEPS_PER_TRIAL))
    # varlen SDPA computes the reference's padded batches exactly as plain SDPA (its own test says so)
    packing = enable_packing(model)
    trainer = LocalTrainer(model, pad_id, target_modules=STEP_TARGETS, batch_size=STEP_BATCH, lr=STEP_LR,
                           packing=packing)

    def fedlora_trial() -> dict:
        clock = StepClock()
        trainer.train(task, examples, on_step=clock)
        return clock.trial()

    def peft_trial() -> dict:
        clock = StepClock()
        trainer.model = peft_adamw_loop(trainer.model, batches, pad_id, clock)
        return clock.trial()

    fedlora_trial(), peft_trial()  # warm-up pair, not timed
    trials = {"fedlora": [], "peft": []}
    for _ in range(PAIRS):
        trials["fedlora"].append(fedlora_trial())
        trials["peft"].append(peft_trial())
    # the timed steps' batches: their padding is what the step times compare (the warm-up steps'
    # batches differ, and at max_length 512 they were the most padded of the trial)
    timed = batches[WARMUP_STEPS:]
    padded_tokens = sum(max(len(e.input_ids) for e in batch) * len(batch) for batch in timed)
    useful_tokens = sum(len(e.input_ids) for batch in timed for e in batch)
    return {"max_length": max_length, "packing": packing, "trials": trials,
            "padded_tokens_per_step": padded_tokens / len(timed),
            "useful_tokens_per_step": useful_tokens / len(timed), "peak_rss_mb": peak_rss_mb()}


# --- (b) server time per round ----------------------------------------------------------------


def part_server() -> dict:
    with tempfile.TemporaryDirectory(prefix="fedlora-perf-") as folder:
        rows, _ = run_federation(SERVER_RUN, Path(folder) / "run")
    keys = ("round", "clients", "client_seconds", "server_seconds", "eval_seconds", "seconds")
    return {"rounds": [{key: row[key] for key in keys} for row in rows if row["round"] > 0],
            "peak_rss_mb": peak_rss_mb()}


# --- (c) memory against the number of clients -------------------------------------------------


def write_split_clients(folder: Path, count: int, pooled: list[dict]) -> Path:
    """The first MEMORY_RECORDS pooled records in ``count`` equal client files, plus a small test file."""
    folder.mkdir(parents=True)
    share = MEMORY_RECORDS // count
    for client in range(count):
        chunk = pooled[client * share:(client + 1) * share]
        (folder / f"local_training_{client}.json").write_text(json.dumps(chunk))
    (folder / "global_test.json").write_text(json.dumps(pooled[-8:]))
    return folder


def part_memory(data: str) -> dict:
    from fedlora.runtime.inprocess import run_inprocess

    with tempfile.TemporaryDirectory(prefix="fedlora-perf-") as folder:
        clients = len(list(Path(data).glob("local_training_*.json")))
        setup = prepare({**MEMORY_RUN, "local_steps": MEMORY_STEPS_PER_ROUND // clients, "data": data},
                        Path(folder) / "run")
        # Tokenise all records once: the tokenizer's word cache (bounded) grows with the distinct
        # text seen, and K clients see K times the records one client does in the same steps.
        for examples in setup.client_examples.values():
            all(examples[i] for i in range(len(examples)))
        setup_rss = current_rss_mb()  # model, records and tokenizer cache loaded, nothing trained
        ledger = run_inprocess(setup)["communication"]
    # Every client takes part in every round, so what each downloads in round 2 is round 1's global adapter.
    last = setup.federation.rows[-1].to_json()
    return {"clients": len(setup.client_examples), "setup_rss_mb": setup_rss,
            "peak_rss_mb": peak_rss_mb(), "adapter_bytes": ledger["bytes_up"] / ledger["participations"],
            "global_bytes": last["bytes_down"] / len(last["clients"])}


def tiny_llama_bytes() -> int:
    from fedlora.models import load_model

    model, _ = load_model("tiny-llama")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure_memory(threads: list[str]) -> tuple[dict[int, list[dict]], int]:
    """K -> one result per repeat; and the model's size. The client files are written here, in
    the parent, so that reading the pooled records does not count in any measurement."""
    with tempfile.TemporaryDirectory(prefix="fedlora-perf-") as folder:
        pooled = json.loads(pool_dolly(Path(folder) / "pooled.json").read_text())
        folders = {count: write_split_clients(Path(folder) / f"clients-{count}", count, pooled)
                   for count in MEMORY_CLIENTS}
        results = {count: [] for count in MEMORY_CLIENTS}
        for repeat in range(MEMORY_REPEATS):
            progress(f"(c) peak RSS with {', '.join(map(str, MEMORY_CLIENTS))} tiny-llama clients, "
                     f"repeat {repeat + 1}/{MEMORY_REPEATS}")
            for count, data in folders.items():
                results[count].append(measure_in_subprocess(
                    __file__, ["--part", "memory", "--data", str(data), *threads]))
    return results, tiny_llama_bytes()


# --- (d) held-out loss ------------------------------------------------------------------------


def padded_full_logits_loss(model, examples, pad_id: int, batch_size: int) -> float:
    """The reference: the held-out loss as fedlora computed it before packing – length-sorted
    right-padded batches, logits at every position, cross-entropy over the labelled ones."""
    from fedlora.data import IGNORE_INDEX, collate
    from fedlora.forward import eval_mode

    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total_nll, total_tokens = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            predicted, targets = logits[:, :-1, :].float(), batch["labels"][:, 1:]
            total_nll += torch.nn.functional.cross_entropy(
                predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                reduction="sum").item()
            total_tokens += int((targets != IGNORE_INDEX).sum())
    return total_nll / total_tokens


def part_heldout() -> dict:
    from fedlora.attention import enable_packing
    from fedlora.data import load_records, tokenize_records
    from fedlora.eval.loss import evaluate_loss_tokenized
    from fedlora.models import load_model, pad_token_id

    model, tokenizer = load_model(STEP_MODEL)
    pad_id = pad_token_id(tokenizer)
    examples, _ = tokenize_records(tokenizer, load_records(DOLLY_TEST)[:HELDOUT_RECORDS], HELDOUT_MAX_LENGTH)
    packing = enable_packing(model)  # padded batches are computed exactly as by plain SDPA

    def new() -> float:
        return evaluate_loss_tokenized(model, examples, pad_id, batch_size=HELDOUT_BATCH, packed=packing)["eval_loss"]

    def old() -> float:
        return padded_full_logits_loss(model, examples, pad_id, HELDOUT_BATCH)

    timed(new), timed(old)  # warm-up pair, not timed
    trials = {"new": [], "old": []}
    for _ in range(HELDOUT_PAIRS):
        trials["new"].append(timed(new))
        trials["old"].append(timed(old))
    lengths = sorted(len(e.input_ids) for e in examples)
    padded = sum(max(lengths[i:i + HELDOUT_BATCH]) * len(lengths[i:i + HELDOUT_BATCH])
                 for i in range(0, len(lengths), HELDOUT_BATCH))
    labelled = sum(label != -100 for e in examples for label in e.labels[1:])
    return {"packing": packing, "trials": trials, "real_tokens": sum(lengths), "padded_tokens": padded,
            "labelled_tokens": labelled, "peak_rss_mb": peak_rss_mb()}


# --- (e) MMLU ---------------------------------------------------------------------------------


def left_padded_mmlu_scores(model, tokenizer, questions, batch_size: int) -> torch.Tensor:
    """The reference: MMLU letter scores as fedlora computed them before packing – length-sorted
    batches, left-padded with explicit position ids, logits of the last position only."""
    from fedlora.data.mmlu import LETTERS, mmlu_prompt
    from fedlora.forward import eval_mode
    from fedlora.eval.mmlu import answer_tokens
    from fedlora.models import pad_token_id

    prompts = [mmlu_prompt(question) for question in questions]
    form = answer_tokens(tokenizer, prompts[0])
    contexts = [tokenizer(form.context(prompt))["input_ids"] for prompt in prompts]
    letter_ids = torch.tensor(form.letter_ids)
    scores = torch.empty(len(questions), len(LETTERS))
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            width = max(len(contexts[i]) for i in indices)
            input_ids = torch.full((len(indices), width), pad_token_id(tokenizer), dtype=torch.long)
            attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
            for row, i in enumerate(indices):
                input_ids[row, width - len(contexts[i]):] = torch.tensor(contexts[i])
                attention_mask[row, width - len(contexts[i]):] = 1
            position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
            last = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         logits_to_keep=1).logits[:, -1, :].float()
            scores[indices] = last.log_softmax(dim=-1)[:, letter_ids]
    return scores


def part_mmlu() -> dict:
    model, tokenizer, questions, packing, new = timed_mmlu_scoring(STEP_MODEL, MMLU_BATCH)
    old = timed(lambda: left_padded_mmlu_scores(model, tokenizer, questions, MMLU_BATCH))
    new_scores, old_scores = new.pop("value"), old.pop("value")
    new_choices, old_choices = new_scores.argmax(dim=-1), old_scores.argmax(dim=-1)
    answers = torch.tensor(["ABCD".index(question.answer) for question in questions])
    return {"packing": packing, "questions": len(questions), "threads": torch.get_num_threads(),
            "new": new, "old": old, "same_choices": int((new_choices == old_choices).sum()),
            "max_score_difference": float((new_scores - old_scores).abs().max()),
            "accuracy_new": float((new_choices == answers).float().mean()),
            "accuracy_old": float((old_choices == answers).float().mean()), "peak_rss_mb": peak_rss_mb()}


# --- (f) the demo on Flower -----------------------------------------------------------------


def run_demo(out: Path, runtime: str) -> dict:
    """Wall seconds of ``fedlora run configs/demo.toml`` on ``runtime``, and its metrics rows."""
    from fedlora.engine.metrics import read_metrics

    seconds = run_cli(["run", str(DEMO_CONFIG), "--out", str(out), "--runtime", runtime])
    return {"seconds": seconds, "rows": [{key: row.get(key) for key in DEMO_KEYS} for row in read_metrics(out)]}


def part_demo() -> dict:
    with tempfile.TemporaryDirectory(prefix="fedlora-perf-") as folder:
        inprocess = run_demo(Path(folder) / "inprocess", "inprocess")
        flower = run_demo(Path(folder) / "flower", "flower")
    return {"inprocess": inprocess, "flower": flower, "identical": inprocess["rows"] == flower["rows"]}


# --- (h) CLI start-up ---------------------------------------------------------------------------

# Runs the CLI in this interpreter as its console script does, then names the heavy modules loaded.
CLI_PROBE = ("import sys\n"
             "sys.argv = ['fedlora', *sys.argv[1:]]\n"
             "from fedlora.cli import app\n"
             "try:\n    app()\n"
             "except SystemExit:\n    pass\n" + HEAVY_REPORT)


def part_cli() -> dict:
    """Wall seconds of each command from a fresh process (repeats), and the heavy modules it imported."""
    script = Path(sys.executable).parent / "fedlora"
    results = {}
    for command in CLI_COMMANDS:
        seconds = [timed(lambda: subprocess.run([str(script), *command], capture_output=True, check=True))["wall"]
                   for _ in range(CLI_REPEATS)]
        probe = subprocess.run([sys.executable, "-c", CLI_PROBE, *command], capture_output=True, text=True,
                               check=True)
        results[" ".join(command)] = {"seconds": seconds, "heavy_imports": heavy_imports(probe.stderr)}
    return results


# --- (g) aggregation --------------------------------------------------------------------------


def aggregation_section(mode: str, threads: int, load: float) -> list[str]:
    """The aggregation benchmark's table, measured now (``run``) or read from its results file."""
    if mode == "latest":
        text = (RESULTS / aggregation.RESULTS_FILE).read_text(encoding="utf-8")
        source = f"read from `{aggregation.RESULTS_FILE}` as last written, not re-measured in this run"
    else:
        results = {}
        for name, memory in aggregation.MEASUREMENTS:
            progress(f"(g) aggregation: {name}, {memory} memory")
            results[f"{name}, {memory}"] = measure_in_subprocess(
                aggregation.__file__, ["--case", name, "--threads", str(threads)], env=aggregation.MEMORY[memory])
        text = aggregation.report(results, threads, load)
        source = "measured in this run with `benchmarks/aggregation.py`'s measurement code"
    body = text.split("\n", 1)[1].strip()  # without its title: it becomes a section here
    return [f"## (g) Aggregation: {source}", "", body, ""]


# --- report -----------------------------------------------------------------------------------


def ratio_cells(values: list[float], goal: float | None, *, at_least: bool = False, digits: str = ".3f") -> list[str]:
    """min, median, max, the goal and whether the median meets it (≤ goal, or ≥ with ``at_least``)."""
    low, middle, high = spread(values)
    if goal is None:
        goal_cells = ["—", "—"]
    else:
        meets = middle >= goal if at_least else middle <= goal
        goal_cells = [f"{'≥' if at_least else '≤'} {goal:.3g}", "yes" if meets else "no"]
    return [f"{low:{digits}}", f"{middle:{digits}}", f"{high:{digits}}", *goal_cells]


def step_section(result: dict) -> tuple[list[str], list[list]]:
    trials, length = result["trials"], result["max_length"]
    useful = result["useful_tokens_per_step"]
    rows = [[arm, *(spread_text([t[key] for t in trials[arm]]) for key in
                    ("step_cpu", "step_wall", "call_cpu", "call_wall")),
             f"{useful / statistics.median(t['step_cpu'] for t in trials[arm]):.0f}"] for arm in ("fedlora", "peft")]
    lines = [
        f"## (a) Client training step, max_length {length}", "",
        f"{STEP_MODEL}, LoRA rank {STEP_RANK} on {', '.join(STEP_TARGETS)}, batch {STEP_BATCH}, max_length "
        f"{length}: {useful:.0f} useful (non-pad) tokens per timed step, {result['padded_tokens_per_step']:.0f} "
        f"once padded; AdamW lr {STEP_LR}. One model in one process; the same {STEPS_PER_TRIAL} batches (the "
        f"ones LocalTrainer draws) per trial; one untimed warm-up pair, then {PAIRS} pairs fedlora, PEFT, "
        f"fedlora, PEFT, … A trial's step time is its mean after {WARMUP_STEPS} warm-up steps; the whole call "
        "adds attaching, unwrapping and (fedlora) extracting the factors. fedlora: `LocalTrainer.train`, "
        f"{'each batch packed in one row (varlen SDPA)' if result['packing'] else 'padded batches (no packing)'}, "
        "the LM head only where a label is; PEFT: `get_peft_model` + `torch.optim.AdamW` loop + `unload` on "
        "the padded batches, transformers' own loss. Both arms train on the same tokens, so useful tokens per "
        "second fedlora ÷ PEFT is PEFT's step time ÷ fedlora's (the former goal, step time ≤ 1.05 × PEFT's, "
        "is ≥ 0.95 on it). Seconds, min / median / max over trials; peak RSS "
        f"{result['peak_rss_mb']:.0f} MB.", "",
        *markdown_table(["arm", "step CPU s", "step wall s", "whole call CPU s", "whole call wall s",
                         "useful tokens / CPU s"], rows), ""]
    goal = STEP_TOKENS_GOALS[length]
    summary = [[f"(a) useful tokens/s, fedlora ÷ PEFT ({clock}), max_length {length}",
                *ratio_cells([1 / r for r in step_ratios(trials, key)], goal, at_least=True)]
               for key, clock in (("step_cpu", "CPU"), ("step_wall", "wall"))]
    summary.append([f"(a) whole train call incl. setup, fedlora ÷ PEFT (CPU), max_length {length}",
                    *ratio_cells(step_ratios(trials, "call_cpu"), None)])
    return lines, summary


def step_ratios(trials: dict, key: str) -> list[float]:
    return [a[key] / b[key] for a, b in zip(trials["fedlora"], trials["peft"], strict=True)]


def server_section(result: dict) -> tuple[list[str], list[list]]:
    rounds = result["rounds"]
    rows = [[r["round"], len(r["clients"]), f"{r['client_seconds']:.2f}", f"{r['server_seconds']:.4f}",
             f"{r['server_seconds'] / r['client_seconds']:.4f}", f"{r['eval_seconds']:.2f}", f"{r['seconds']:.2f}"]
            for r in rounds]
    run = SERVER_RUN
    lines = [
        "## (b) Server time per round ÷ client compute per round", "",
        f"A real in-process FLoRA run: {run['model']}, Dolly clients with ranks "
        f"{','.join(map(str, run['ranks']))}, {run['clients_per_round']} clients × {run['local_steps']} steps "
        f"× {run['rounds']} rounds, batch {run['batch_size']}, max_length {run['max_length']}, held-out loss on "
        f"{run['test_limit']} records and answers to {run['generation_limit']} held-out prompts (rounds 0 and last). "
        "Server = "
        "validation + aggregation + merge into the base (`server_seconds`); client = the clients' "
        "`train` calls (`client_seconds`); evaluation is shown apart and not in the ratio; the round "
        f"(`seconds`) is all three, sampling included. Peak RSS {result['peak_rss_mb']:.0f} MB.", "",
        *markdown_table(["round", "clients", "client s", "server s", "server ÷ client", "eval s", "round s"],
                        rows), ""]
    ratios = [r["server_seconds"] / r["client_seconds"] for r in rounds]
    return lines, [["(b) server ÷ client compute per round (wall)", *ratio_cells(ratios, SERVER_GOAL)]]


def memory_section(results: dict[int, list[dict]], model_bytes: int) -> tuple[list[str], list[list]]:
    mb = 1 << 20
    model_mb = model_bytes / mb
    peaks = {count: [r["peak_rss_mb"] for r in repeats] for count, repeats in results.items()}
    baseline = statistics.median(peaks[1])
    rows, summary = [], []
    for count, repeats in results.items():
        growth = statistics.median(peaks[count]) - baseline
        adapters_mb = count * repeats[0]["adapter_bytes"] / mb
        allowed = MODEL_COPIES_ALLOWED * model_mb + adapters_mb
        verdict = "pass" if growth <= allowed else "fail"
        rows.append([count, f"{statistics.median(r['setup_rss_mb'] for r in repeats):.1f}",
                     spread_text(peaks[count], 1), f"{growth:.2f}", f"{adapters_mb:.2f}",
                     f"{repeats[0]['global_bytes'] / mb:.2f}", f"{growth / model_mb:.1f}",
                     f"{growth / adapters_mb:.2f}", f"{allowed:.2f}", verdict])
        if count > 1:
            in_models = [(peak - baseline) / model_mb for peak in peaks[count]]
            summary.append([f"(c) (peak − peak(K=1)) ÷ model size, K={count}",
                            *ratio_cells(in_models, allowed / model_mb)])
    large = max(results)
    slope_kb = (statistics.median(peaks[large]) - baseline) * 1024 / (large - 1)
    adapter_kb = results[large][0]["adapter_bytes"] / 1024
    run = MEMORY_RUN
    lines = [
        "## (c) Peak RSS against the number of clients", "",
        f"{run['model']} ({model_mb:.2f} MB of float32 parameters), FLoRA rank {run['ranks'][0]} "
        f"({adapter_kb:.1f} KB adapter per client), every client sampled every round (fraction "
        f"{run['fraction']}), {run['rounds']} rounds of {MEMORY_STEPS_PER_ROUND} training steps split evenly "
        f"among the K clients (K=1: one client, {MEMORY_STEPS_PER_ROUND} local steps; K={max(MEMORY_CLIENTS)}: "
        f"{MEMORY_STEPS_PER_ROUND // max(MEMORY_CLIENTS)} step each), batch {run['batch_size']}, "
        f"max_length {run['max_length']}; the same {MEMORY_RECORDS} Dolly records split into K equal client "
        "files. Data and training work are the same for every K, so only the number of clients grows (with "
        "one step per client at every K, the K=1 baseline would also skip the warm-up that many steps give "
        f"the allocator pools and Python free lists). One subprocess per measurement, {MEMORY_REPEATS} repeats "
        "per K; peak RSS is its `ru_maxrss` (min / median / max), RSS after setup its VmRSS once the model "
        "and the clients' records are loaded and every record has been tokenised once (the tokenizer's "
        "bounded word cache grows with the distinct text seen, and K clients see K times the records one "
        "client sees). Growth is the median peak minus the median peak with K=1. "
        f"Check: growth ≤ {MODEL_COPIES_ALLOWED} × model + K × adapter. The global adapter FLoRA builds "
        "(its size from the ledger) is the K adapters stacked: each upload is copied into its slot of the "
        "stack as it arrives and freed, so uploads and stack are never all held at once.", "",
        *markdown_table(["K clients", "RSS after setup MB", "peak RSS MB", "growth MB", "K × adapter MB",
                         "global adapter MB", "growth ÷ model", "growth ÷ (K × adapter)", "allowed MB", "check"],
                        rows), "",
        f"From K=1 to K={large}, each client adds {slope_kb:.0f} KB to the peak: {slope_kb / adapter_kb:.1f} adapter "
        f"sizes (its block of the stack, plus its bookkeeping and allocator slack), "
        f"{slope_kb / 1024 / model_mb:.2f} model sizes.", ""]
    return lines, summary


def heldout_section(result: dict) -> tuple[list[str], list[list]]:
    trials = result["trials"]
    labels = {"new": "fedlora (packed, logits where labelled)", "old": "padded, full logits (before)"}
    rows = [[labels[arm], spread_text([t["cpu"] for t in trials[arm]]), spread_text([t["wall"] for t in trials[arm]]),
             f"{trials[arm][0]['value']:.8f}"] for arm in ("new", "old")]
    ratios = [n["cpu"] / o["cpu"] for n, o in zip(trials["new"], trials["old"], strict=True)]
    differences = [abs(n["value"] - o["value"]) / abs(o["value"]) for n, o in zip(trials["new"], trials["old"])]
    lines = [
        "## (d) Held-out loss", "",
        f"{STEP_MODEL} on the first {HELDOUT_RECORDS} records of Dolly's `global_test.json`, max_length "
        f"{HELDOUT_MAX_LENGTH}, {HELDOUT_BATCH} records per batch (the run defaults), sorted by length: "
        f"{result['real_tokens']} tokens ({result['padded_tokens']} once padded), {result['labelled_tokens']} of "
        "them predict a label. fedlora: `evaluate_loss_tokenized` with "
        f"{'packed rows (varlen SDPA)' if result['packing'] else 'padded batches (no packing)'} and the LM "
        "head only at those positions; before: right-padded batches, logits at every position, cross-entropy "
        f"over the labelled ones (the code this replaced). One untimed warm-up pair, then {HELDOUT_PAIRS} "
        f"pairs. Seconds, min / median / max; peak RSS {result['peak_rss_mb']:.0f} MB.", "",
        *markdown_table(["computation", "CPU s", "wall s", "held-out loss"], rows), ""]
    return lines, [["(d) held-out loss time, fedlora ÷ before (CPU)", *ratio_cells(ratios, HELDOUT_GOAL)],
                   ["(d) held-out loss value, |fedlora − before| ÷ before",
                    *ratio_cells(differences, HELDOUT_VALUE_GOAL, digits=".1e")]]


def mmlu_section(result: dict) -> tuple[list[str], list[list]]:
    total = result["questions"]
    rows = [[name, f"{result[arm]['wall']:.1f}", f"{result[arm]['cpu']:.1f}", f"{result[f'accuracy_{arm}']:.4f}"]
            for arm, name in (("new", "fedlora (packed, last position only)"),
                              ("old", "left-padded, last position only (before)"))]
    lines = [
        "## (e) MMLU, every question", "",
        f"{STEP_MODEL}, all {total} questions of `mmlu_test_1444.json`, {MMLU_BATCH} per batch sorted by "
        f"length, {result['threads']} intra-op threads (every core, as `fedlora eval` runs). fedlora: "
        f"`answer_log_likelihoods` with {'packed rows (varlen SDPA)' if result['packing'] else 'padded batches'}; "
        "before: left padding with explicit position ids (the code this replaced). Both apply the LM head to "
        f"the last position only. {result['same_choices']} of {total} choices are the same; the largest "
        f"difference of a letter's log-probability is {result['max_score_difference']:.1e}. Peak RSS "
        f"{result['peak_rss_mb']:.0f} MB.", "",
        *markdown_table(["scoring", "wall s", "CPU s", "accuracy"], rows), ""]
    return lines, [[f"(e) MMLU, all {total} questions, fedlora wall s", *ratio_cells([result["new"]["wall"]],
                                                                                  MMLU_GOAL_SECONDS, digits=".0f")],
                   ["(e) MMLU choices equal to the left-padded path's", *ratio_cells(
                       [result["same_choices"] / total], 1.0, at_least=True)]]


def demo_section(result: dict) -> tuple[list[str], list[list]]:
    inprocess, flower = result["inprocess"], result["flower"]
    rows = [[row["round"], f"{row['eval_loss']:.4f}", f"{other['eval_loss']:.4f}",
             "—" if row["train_loss"] is None else f"{row['train_loss']:.4f}",
             "—" if row.get("rouge_l") is None else f"{row['rouge_l']:.4f}"]
            for row, other in zip(inprocess["rows"], flower["rows"], strict=True)]
    lines = [
        "## (f) The demo on Flower's Deployment Engine", "",
        f"`fedlora run {DEMO_CONFIG}` (the `make demo` run) once in-process and once with `--runtime flower` "
        "(a SuperLink and one SuperNode per client on 127.0.0.1, started and stopped by the run), each in a "
        f"fresh run folder, every core: {inprocess['seconds']:.0f} s in-process, {flower['seconds']:.0f} s on "
        f"Flower. Every metric of every round ({', '.join(DEMO_KEYS)}) is "
        f"{'bit-identical' if result['identical'] else 'NOT identical'} between the two.", "",
        *markdown_table(["round", "eval loss in-process", "eval loss Flower", "train loss", "ROUGE-L"], rows), ""]
    return lines, [["(f) demo wall time, Flower ÷ in-process",
                    *ratio_cells([flower["seconds"] / inprocess["seconds"]], DEMO_GOAL)],
                   ["(f) demo metrics bit-identical (1 = yes)", *ratio_cells([float(result["identical"])], 1.0,
                                                                             at_least=True, digits=".0f")]]


def cli_section(result: dict) -> tuple[list[str], list[list]]:
    rows = [[f"`fedlora {command}`", spread_text(entry["seconds"], 2),
             ", ".join(entry["heavy_imports"]) or "none"] for command, entry in result.items()]
    lines = ["## (h) CLI start-up", "",
             f"Each command run {CLI_REPEATS} times from a fresh process (the installed console script, "
             f"output discarded); heavy modules: which of {', '.join(HEAVY_MODULES)} the command imported "
             "(checked once, in a process that runs the CLI and then lists them). Wall seconds, min / median / max.",
             "", *markdown_table(["command", "wall s", "heavy modules imported"], rows), ""]
    return lines, [[f"(h) `fedlora {command}` wall s", *ratio_cells(entry["seconds"], CLI_GOAL_SECONDS,
                                                                      digits=".2f")]
                   for command, entry in result.items()]


#: each part's section and summary rows as last measured: ``--parts`` re-measures some, keeps the others
SECTIONS_FILE = "perf_sections.json"


def sections_of(results: dict, aggregation_lines: list[str]) -> dict[str, dict]:
    """Part → its section's lines and summary rows, stamped with when they were measured.
    ``results``: part → its result (``step``: one per max_length, ``memory``: (repeats, model bytes))."""
    builders = {"step": lambda steps: [step_section(step) for step in steps], "server": lambda r: [server_section(r)],
                "memory": lambda r: [memory_section(*r)], "heldout": lambda r: [heldout_section(r)],
                "mmlu": lambda r: [mmlu_section(r)], "demo": lambda r: [demo_section(r)],
                "cli": lambda r: [cli_section(r)]}
    measured = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    sections = {}
    for part, result in results.items():
        built = builders[part](result)
        sections[part] = {"lines": [line for lines, _ in built for line in lines],
                          "rows": [row for _, rows in built for row in rows], "measured": measured}
    if aggregation_lines:
        sections["aggregation"] = {"lines": aggregation_lines, "rows": [], "measured": measured}
    return sections


def report(sections: dict[str, dict], measured: list[str], threads: int, load: float, seconds: float) -> str:
    """perf.md from every part's section; those not in ``measured`` are kept from an earlier run, and say when."""
    parts = [part for part in PARTS if part in sections]
    kept = [f"{part} ({sections[part]['measured']})" for part in parts if part not in measured]
    head = [
        "# Performance benchmark", "", environment_line(threads, load), "",
        "Every figure is a ratio of two measurements taken side by side in this run, or a time against its "
        "goal. Each part runs in its own subprocess. Generated by `benchmarks/perf.py` (`make bench-perf`) in "
        f"{seconds / 60:.1f} min" + (f", measuring {', '.join(measured)}; kept as last measured (`--parts`): "
                                     f"{', '.join(kept)}." if kept else "."),
        "", *markdown_table(["figure", "min", "median", "max", "goal", "met (median)"],
                            [row for part in parts for row in sections[part]["rows"]]), ""]
    return "\n".join(head + [line for part in parts for line in sections[part]["lines"]])


# --- main -------------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"[perf] {message}", file=sys.stderr, flush=True)


def run_part(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.part == "step":
        return part_step(args.max_length)
    if args.part == "memory":
        return part_memory(args.data)
    return {"server": part_server, "heldout": part_heldout, "mmlu": part_mmlu, "demo": part_demo,
            "cli": part_cli}[args.part]()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS[:-1], help="one measurement, as JSON (internal)")
    parser.add_argument("--data", help="client folder for --part memory (internal)")
    parser.add_argument("--max-length", type=int, help="max_length for --part step (internal)")
    # One thread, as in benchmarks/aggregation.py: on a small shared machine OpenMP threads
    # spin against other processes and timings become erratic. MMLU and the demo use every core.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default all: {','.join(PARTS)}); the others keep their "
                             "last results")
    parser.add_argument("--aggregation", choices=("run", "latest"), default="run",
                        help="(g): re-run the aggregation measurements (default, ~3 min) or read their results file")
    args = parser.parse_args()
    if args.part:
        print(json.dumps(run_part(args)))
        return
    parts = [part for part in PARTS if part in args.parts.split(",")]
    require_shared_data()
    started, load = time.perf_counter(), os.getloadavg()[0]
    threads = ["--threads", str(args.threads)]
    every_core = ["--threads", str(os.cpu_count() or 1)]
    results: dict = {}
    if "step" in parts:
        results["step"] = []
        for length in STEP_TOKENS_GOALS:
            progress(f"(a) step time at max_length {length}: {1 + PAIRS} pairs × {STEPS_PER_TRIAL} steps")
            results["step"].append(measure_in_subprocess(__file__, ["--part", "step", "--max-length", str(length),
                                                                    *threads]))
    if "server" in parts:
        progress(f"(b) server time: FLoRA run, {SERVER_RUN['rounds']} rounds")
        results["server"] = measure_in_subprocess(__file__, ["--part", "server", *threads])
    if "memory" in parts:
        results["memory"] = measure_memory(threads)
    if "heldout" in parts:
        progress(f"(d) held-out loss: {1 + HELDOUT_PAIRS} pairs")
        results["heldout"] = measure_in_subprocess(__file__, ["--part", "heldout", *threads])
    if "mmlu" in parts:
        progress("(e) MMLU: every question, fedlora's scoring and the one before")
        results["mmlu"] = measure_in_subprocess(__file__, ["--part", "mmlu", *every_core])
    if "demo" in parts:
        progress("(f) the demo, in-process and on Flower")
        results["demo"] = measure_in_subprocess(__file__, ["--part", "demo"])
    if "cli" in parts:
        progress(f"(h) CLI start-up: {len(CLI_COMMANDS)} commands × {CLI_REPEATS}")
        results["cli"] = measure_in_subprocess(__file__, ["--part", "cli"])
    aggregation_lines = aggregation_section(args.aggregation, args.threads, load) if "aggregation" in parts else []
    previous = RESULTS / SECTIONS_FILE
    sections = {**(json.loads(previous.read_text(encoding="utf-8")) if previous.is_file() else {}),
                **sections_of(results, aggregation_lines)}
    write_result(SECTIONS_FILE, json.dumps(sections, indent=1, ensure_ascii=False) + "\n")
    text = report(sections, parts, args.threads, load, time.perf_counter() - started)
    write_result("perf.md", text)
    print(text)


if __name__ == "__main__":
    main()
