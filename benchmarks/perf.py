"""Performance benchmark: fedlora's costs as ratios measured side by side in one run.

(a) client training step: fedlora's LocalTrainer.train ÷ a bare PEFT + torch AdamW loop on the
    same SmolLM2-135M and the same fixed batches, interleaved A B A B … to cancel drift;
(b) server time per round ÷ client compute per round, from a real in-process FLoRA run of
    SmolLM2 with heterogeneous ranks on the Dolly clients (evaluation reported apart);
(c) peak RSS of K tiny-llama clients in one process, against the base model and K adapters;
(d) the aggregation table of benchmarks/aggregation.py.

Every measurement runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own.
Run from the repository root: ``make bench-perf``. Writes benchmarks/results/perf.md and prints it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import aggregation
from common import DOLLY, dolly_client_files, environment_line, markdown_table, \
    measure_in_subprocess, peak_rss_mb, pool_dolly, prepare, require_shared_data, run_federation, spread, \
    spread_text, write_result

# (a) client training step
STEP_MODEL = "smollm2-135m"
STEP_RANK, STEP_TARGETS, STEP_BATCH, STEP_MAX_LENGTH, STEP_LR = 16, ("q_proj", "v_proj"), 4, 128, 3e-4
STEPS_PER_TRIAL = 6
WARMUP_STEPS = 2  # excluded from every trial: first-call allocations and caches
PAIRS = 3  # timed (fedlora, PEFT) pairs, after one untimed warm-up pair
STEP_GOAL = 1.05

# (b) server ÷ client time, a real FLoRA run
SERVER_RUN = {"model": "smollm2-135m", "data": str(DOLLY), "method": "flora",
              "ranks": [64, 32, 16, 16, 8, 8, 4, 4, 4], "clients_per_round": 3, "local_steps": 3,
              "rounds": 3, "batch_size": 4, "max_length": 128, "test_limit": 16, "mmlu_limit": 8, "seed": 0}
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


def part_step() -> dict:
    from fedlora.data import load_records, tokenize_records
    from fedlora.engine.client import LocalTrainer, batch_stream
    from fedlora.engine.task import ClientTask
    from fedlora.eval.loss import pad_token_id
    from fedlora.models import load_model

    model, tokenizer = load_model(STEP_MODEL)
    pad_id = pad_token_id(tokenizer)
    records = load_records(dolly_client_files()[0])[:STEPS_PER_TRIAL * STEP_BATCH]
    examples, _ = tokenize_records(tokenizer, records, STEP_MAX_LENGTH)
    task = ClientTask(client_id="0", server_round=1, rank=STEP_RANK, alpha=2 * STEP_RANK,
                      trainable=frozenset("AB"), init_seed=0, data_seed=0, local_steps=STEPS_PER_TRIAL,
                      start=None)
    # the batches LocalTrainer draws for this task, in its order, given to the reference as a list
    batches = list(itertools.islice(batch_stream(examples, STEP_BATCH, task.data_seed), STEPS_PER_TRIAL))
    trainer = LocalTrainer(model, pad_id, target_modules=STEP_TARGETS, batch_size=STEP_BATCH, lr=STEP_LR)

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
    padded_tokens = sum(max(len(e.input_ids) for e in batch) * len(batch) for batch in batches)
    return {"trials": trials, "padded_tokens_per_step": padded_tokens / len(batches),
            "peak_rss_mb": peak_rss_mb()}


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
        setup_rss = aggregation.current_rss_mb()  # model, records and tokenizer cache loaded, nothing trained
        ledger = run_inprocess(setup)["communication"]
    # Every client takes part in every round, so what each downloads in round 2 is round 1's global adapter.
    last = setup.federation.rows[-1]
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


# --- (d) aggregation --------------------------------------------------------------------------


def aggregation_section(mode: str, threads: int) -> list[str]:
    """The aggregation benchmark's table, measured now (``run``) or read from its results file."""
    if mode == "latest":
        text = aggregation.RESULTS.read_text(encoding="utf-8")
        source = f"read from `{aggregation.RESULTS.name}` as last written, not re-measured in this run"
    else:
        results = {}
        for name, memory in aggregation.MEASUREMENTS:
            progress(f"(d) aggregation: {name}, {memory} memory")
            results[f"{name}, {memory}"] = aggregation.measure(name, threads, memory)
        text = aggregation.report(results, threads)
        source = "measured in this run with `benchmarks/aggregation.py`'s measurement code"
    body = text.split("\n", 1)[1].strip()  # without its title: it becomes a section here
    return [f"## (d) Aggregation: {source}", "", body, ""]


# --- report -----------------------------------------------------------------------------------


def step_ratios(trials: dict, key: str) -> list[float]:
    return [a[key] / b[key] for a, b in zip(trials["fedlora"], trials["peft"], strict=True)]


def met(value: float, goal: float) -> str:
    return "yes" if value <= goal else "no"


def step_section(result: dict) -> tuple[list[str], list[list]]:
    trials = result["trials"]
    rows = [[arm, *(spread_text([t[key] for t in trials[arm]]) for key in
                    ("step_cpu", "step_wall", "call_cpu", "call_wall"))] for arm in ("fedlora", "peft")]
    lines = [
        "## (a) Client training step", "",
        f"{STEP_MODEL}, LoRA rank {STEP_RANK} on {', '.join(STEP_TARGETS)}, batch {STEP_BATCH}, max_length "
        f"{STEP_MAX_LENGTH} ({result['padded_tokens_per_step']:.0f} padded tokens per step), AdamW lr {STEP_LR}. "
        f"One model in one process; the same {STEPS_PER_TRIAL} batches (the ones LocalTrainer draws) per "
        f"trial; one untimed warm-up pair, then {PAIRS} pairs fedlora, PEFT, fedlora, PEFT, … A trial's "
        f"step time is its mean after {WARMUP_STEPS} warm-up steps; the whole call adds attaching, "
        "unwrapping and (fedlora) extracting the factors. fedlora: `LocalTrainer.train`; PEFT: "
        "`get_peft_model` + `torch.optim.AdamW` loop + `unload`. Seconds, min / median / max over trials; "
        f"peak RSS {result['peak_rss_mb']:.0f} MB.", "",
        *markdown_table(["arm", "step CPU s", "step wall s", "whole call CPU s", "whole call wall s"], rows), ""]
    summary = [[f"(a) step time, fedlora ÷ PEFT ({clock})", *ratio_cells(step_ratios(trials, key), STEP_GOAL)]
               for key, clock in (("step_cpu", "CPU"), ("step_wall", "wall"))]
    summary.append(["(a) whole train call incl. setup, fedlora ÷ PEFT (CPU)",
                    *ratio_cells(step_ratios(trials, "call_cpu"), None)])
    return lines, summary


def ratio_cells(values: list[float], goal: float | None) -> list[str]:
    low, middle, high = spread(values)
    goal_cells = [f"≤ {goal:.3g}", met(middle, goal)] if goal is not None else ["—", "—"]
    return [f"{low:.3f}", f"{middle:.3f}", f"{high:.3f}", *goal_cells]


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
        f"{run['test_limit']} records and MMLU on {run['mmlu_limit']} questions (final round). Server = "
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


def report(step: dict, server: dict, memory: tuple[dict[int, list[dict]], int], aggregation_lines: list[str],
           threads: int, load: float, seconds: float) -> str:
    sections, summary = [], []
    for lines, rows in (step_section(step), server_section(server), memory_section(*memory)):
        sections += lines
        summary += rows
    head = [
        "# Performance benchmark", "", environment_line(threads, load), "",
        "Every figure is a ratio of two measurements taken side by side in this run. Each part runs in its "
        "own subprocess. Generated by `benchmarks/perf.py` (`make bench-perf`) in "
        f"{seconds / 60:.1f} min.", "",
        *markdown_table(["figure", "min", "median", "max", "goal", "met (median)"], summary), ""]
    return "\n".join(head + sections + aggregation_lines)


# --- main -------------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"[perf] {message}", file=sys.stderr, flush=True)


def run_part(part: str, threads: int, data: str | None) -> dict:
    torch.set_num_threads(threads)
    if part == "step":
        return part_step()
    if part == "server":
        return part_server()
    return part_memory(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("step", "server", "memory"), help="one measurement, as JSON (internal)")
    parser.add_argument("--data", help="client folder for --part memory (internal)")
    # One thread, as in benchmarks/aggregation.py: on a small shared machine OpenMP threads
    # spin against other processes and timings become erratic.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--aggregation", choices=("run", "latest"), default="run",
                        help="(d): re-run the aggregation measurements (default, ~3 min) or read their results file")
    args = parser.parse_args()
    if args.part:
        print(json.dumps(run_part(args.part, args.threads, args.data)))
        return
    require_shared_data()
    started, load = time.perf_counter(), os.getloadavg()[0]
    threads = ["--threads", str(args.threads)]
    progress(f"(a) step time: {1 + PAIRS} pairs × {STEPS_PER_TRIAL} steps")
    step = measure_in_subprocess(__file__, ["--part", "step", *threads])
    progress(f"(b) server time: FLoRA run, {SERVER_RUN['rounds']} rounds")
    server = measure_in_subprocess(__file__, ["--part", "server", *threads])
    memory = measure_memory(threads)
    aggregation_lines = aggregation_section(args.aggregation, args.threads)
    text = report(step, server, memory, aggregation_lines, args.threads, load, time.perf_counter() - started)
    write_result("perf.md", text)
    print(text)


if __name__ == "__main__":
    main()
