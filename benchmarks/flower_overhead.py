"""Where the Flower demo's extra time goes on one machine: two costs, each measured side by side.

(1) Interference: the server's held-out evaluation (SmolLM2, packed, every core, the demo's
    max_length) alone, and with an idle local deployment of the demo's 9 SuperNodes running
    beside it (their SuperExecs poll every second). Alone and beside are interleaved.
(2) Per-message start-up: Flower 1.41 starts a fresh ``flwr-clientapp`` process for every
    message. A fresh interpreter importing ``flwr.clientapp`` (Flower's own floor), fedlora's
    ClientApp module (what an identify or sync message pays), and that plus the least a train
    message pays before it trains (reading its records and replaying its replica come on top):
    transformers and PEFT, the model from the run's cache and the packing probe.

Writes benchmarks/results/flower_overhead.md and prints it. Run from the repository root:
``make bench-flower-overhead`` (about 5 minutes).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import DOLLY_TEST, HEAVY_MODULES, HEAVY_REPORT, environment_line, heavy_imports, markdown_table, \
    require_shared_data, spread_text, write_result

MODEL = "smollm2-135m"
NODES = 9  # configs/demo.toml: one SuperNode per client
EVAL_RECORDS, EVAL_MAX_LENGTH, EVAL_BATCH = 48, 128, 8
REPEATS = 4  # evaluations per arm and round
ROUNDS = 2  # of (alone, beside a fresh deployment)
SETTLE_SECONDS = 20  # a fresh deployment's SuperNodes and SuperExecs finish starting
STARTUP_REPEATS = 3

# what each kind of message imports and loads before its handler's own work; {cache} is the model cache
STARTUP_PROBES = {
    "flwr.clientapp (Flower alone)": "import flwr.clientapp",
    "fedlora's ClientApp module (identify, sync)": "import fedlora.runtime.flower.client_app",
    "+ transformers, PEFT, model from the cache, packing probe (train)": (
        "import fedlora.runtime.flower.client_app, peft\n"
        "from fedlora.attention import enable_packing\n"
        "from fedlora.models import load_model\n"
        "model, _ = load_model({model!r}, gguf_cache={cache!r})\n"
        "enable_packing(model)"),
}


def evaluation():
    """A function computing the held-out loss as the server does, and the number of tokens it reads."""
    from fedlora.attention import enable_packing
    from fedlora.data import load_records, tokenize_records
    from fedlora.eval.loss import evaluate_loss_tokenized
    from fedlora.models import load_model, pad_token_id

    model, tokenizer = load_model(MODEL)
    examples, _ = tokenize_records(tokenizer, load_records(DOLLY_TEST)[:EVAL_RECORDS], EVAL_MAX_LENGTH)
    packed = enable_packing(model)
    pad_id = pad_token_id(tokenizer)

    def run() -> float:
        started = time.perf_counter()
        evaluate_loss_tokenized(model, examples, pad_id, batch_size=EVAL_BATCH, packed=packed)
        return time.perf_counter() - started

    return run, sum(len(e.input_ids) for e in examples)


def measure_interference(folder: Path) -> dict:
    """Wall seconds of the evaluation: alone, and beside an idle deployment."""
    from fedlora.runtime.flower.deployment import LocalDeployment

    run, tokens = evaluation()
    run()  # warm-up
    seconds = {"alone": [], f"beside {NODES} idle SuperNodes": []}
    for index in range(ROUNDS):
        progress(f"(1) evaluation alone, then beside {NODES} idle SuperNodes, round {index + 1}/{ROUNDS}")
        seconds["alone"] += [run() for _ in range(REPEATS)]
        with LocalDeployment(folder / f"deployment-{index}", NODES):
            time.sleep(SETTLE_SECONDS)
            seconds[f"beside {NODES} idle SuperNodes"] += [run() for _ in range(REPEATS)]
    return {"seconds": seconds, "tokens": tokens}


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_startup(cache: Path) -> dict:
    """Per probe: wall and CPU seconds of a fresh interpreter running it, and its heavy imports."""
    results = {label: {"wall": [], "cpu": []} for label in STARTUP_PROBES}
    for repeat in range(STARTUP_REPEATS):
        progress(f"(2) message start-up, repeat {repeat + 1}/{STARTUP_REPEATS}")
        for label, code in STARTUP_PROBES.items():
            source = code.format(model=MODEL, cache=str(cache)) + HEAVY_REPORT
            cpu, wall = child_cpu(), time.perf_counter()
            done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, check=True)
            results[label]["wall"].append(time.perf_counter() - wall)
            results[label]["cpu"].append(child_cpu() - cpu)
            results[label]["heavy"] = heavy_imports(done.stderr)
    return results


def report(interference: dict, startup: dict, load: float, seconds: float) -> str:
    times = interference["seconds"]
    alone = statistics.median(times["alone"])
    rows = [[arm, spread_text(values, 1), f"{statistics.median(values) / alone:.3f}"]
            for arm, values in times.items()]
    startup_rows = [[label, spread_text(r["wall"], 2), spread_text(r["cpu"], 2), ", ".join(r["heavy"]) or "—"]
                    for label, r in startup.items()]
    return "\n".join([
        "# Flower's overhead on one machine", "", environment_line(torch.get_num_threads(), load), "",
        f"Generated by `benchmarks/flower_overhead.py` (`make bench-flower-overhead`) in {seconds / 60:.1f} min.", "",
        "## (1) An idle deployment slows the server's evaluation", "",
        f"Held-out loss of {MODEL} on the first {EVAL_RECORDS} Dolly test records ({interference['tokens']} tokens, "
        f"max_length {EVAL_MAX_LENGTH}, batches of {EVAL_BATCH}, packed), every core, as the ServerApp evaluates: "
        f"alone, and beside an idle local deployment of {NODES} SuperNodes (a SuperLink, the SuperNodes and their "
        f"SuperExecs polling every second, no run): {ROUNDS} rounds of {REPEATS} evaluations alone then {REPEATS} "
        "beside a fresh deployment. Wall seconds min / median / max; ratio: median ÷ "
        "median alone.", "",
        *markdown_table(["arm", "evaluation wall s", "÷ alone"], rows), "",
        "## (2) What every message costs before its handler runs", "",
        f"A fresh interpreter per call, as Flower 1.41 starts one `flwr-clientapp` per message; {STARTUP_REPEATS} "
        "repeats, seconds min / median / max (CPU: the child's user + system time); heavy modules: which of "
        f"{', '.join(HEAVY_MODULES)} it imported.", "",
        *markdown_table(["what the process does", "wall s", "CPU s", "heavy modules"], startup_rows), ""])


def progress(message: str) -> None:
    print(f"[flower-overhead] {message}", file=sys.stderr, flush=True)


def main() -> None:
    from fedlora.models import load_model

    require_shared_data()
    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fedlora-flower-overhead-") as folder:
        interference = measure_interference(Path(folder))
        cache = Path(folder) / "model-cache"
        load_model(MODEL, gguf_cache=cache)  # the run's model cache, as the ServerApp fills it
        startup = measure_startup(cache)
    text = report(interference, startup, load, time.perf_counter() - started)
    write_result("flower_overhead.md", text)
    print(text)


if __name__ == "__main__":
    main()
