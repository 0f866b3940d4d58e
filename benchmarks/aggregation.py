"""Aggregation benchmark on Llama-7B-shaped adapters: FLoRA vs torch.cat and PEFT, factored vs dense SVD,
and the per-round aggregation error computed from the factors vs from dense updates.

Ten clients with ranks 64, 32, 16, 16, 8, 8, 4, 4, 4, 4 adapt q_proj and v_proj (4096×4096) of
32 layers with random float32 factors. Every measurement runs in its own subprocess, so its
peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which includes building the inputs) is
its own; the RSS right after building the inputs is reported next to it.

Run: ``make bench-aggregation``. Writes benchmarks/results/aggregation.md and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from common import current_rss_mb, environment_line, markdown_table, measure_in_subprocess, peak_rss_mb, \
    write_result

from fedlora.aggregation import ClientUpdate, LoraFactors, get_aggregator
from fedlora.aggregation.error import FactoredSum, relative_error
from fedlora.aggregation.factored import stack

LAYERS = 32
PROJECTIONS = ("q_proj", "v_proj")
DIM = 4096
RANKS = (64, 32, 16, 16, 8, 8, 4, 4, 4, 4)
ALPHA = 16.0
NUM_EXAMPLES = [100 + 10 * index for index in range(len(RANKS))]
MODULES = [f"model.layers.{layer}.self_attn.{projection}"
           for layer in range(LAYERS) for projection in PROJECTIONS]
RESULTS_FILE = "aggregation.md"


def client_tensors(index: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Client ``index``'s (A, B) per module; seeded, so every subprocess builds the same adapters."""
    generator = torch.Generator().manual_seed(index)
    rank = RANKS[index]
    return {module: (torch.randn(rank, DIM, generator=generator), torch.randn(DIM, rank, generator=generator))
            for module in MODULES}


def client_updates() -> list[ClientUpdate]:
    return [ClientUpdate({module: LoraFactors(A=A, B=B, scale=ALPHA / RANKS[index])
                          for module, (A, B) in client_tensors(index).items()},
                         num_examples=NUM_EXAMPLES[index], client_id=f"client{index}")
            for index in range(len(RANKS))]


def example_shares() -> list[float]:
    """FLoRA's default weights p_k, given to PEFT explicitly."""
    return [count / sum(NUM_EXAMPLES) for count in NUM_EXAMPLES]


def case_torch_cat() -> tuple[Callable[[], object], str]:
    updates = client_updates()

    def concatenate():
        return {module: (torch.cat([u.factors[module].B for u in updates], dim=1),
                         torch.cat([u.factors[module].A for u in updates], dim=0)) for module in MODULES}
    return concatenate, f"bare torch.cat of B (dim 1) and A (dim 0), {len(MODULES)} modules"


def case_flora() -> tuple[Callable[[], object], str]:
    updates, flora = client_updates(), get_aggregator("flora")
    return (lambda: flora.aggregate(updates)), f"FLoRA().aggregate incl. input checks, {len(MODULES)} modules"


def case_flora_stack() -> tuple[Callable[[], object], str]:
    updates, weights = client_updates(), example_shares()
    return (lambda: stack(updates, weights)), "factored.stack alone (FLoRA without its input checks)"


def case_peft_cat() -> tuple[Callable[[], object], str]:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(DIM, DIM, bias=False)
            self.v_proj = nn.Linear(DIM, DIM, bias=False)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleDict({"self_attn": Attention()}) for _ in range(LAYERS))

    # Base weights are built on the meta device and then allocated but never written, so the OS
    # does not back their 4 GB with memory: neither PEFT nor FLoRA reads them for a cat merge.
    with torch.device("meta"):
        base = Model()
    base = base.to_empty(device="cpu")
    holder = nn.Module()
    holder.model = base
    model = None
    for index, rank in enumerate(RANKS):
        config = LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=list(PROJECTIONS))
        if model is None:
            model = get_peft_model(holder, config, adapter_name=f"client{index}")
        else:
            model.add_adapter(f"client{index}", config)
    layers = {name.removeprefix("base_model.model."): layer for name, layer in model.named_modules()
              if isinstance(layer, LoraLayer)}
    with torch.no_grad():
        for index in range(len(RANKS)):
            for module, (A, B) in client_tensors(index).items():
                layers[module].lora_A[f"client{index}"].weight.copy_(A)
                layers[module].lora_B[f"client{index}"].weight.copy_(B)
    names, weights, calls = [f"client{index}" for index in range(len(RANKS))], example_shares(), []

    def merge():
        # Each call must create a new adapter name (an existing name is a no-op); the earlier
        # cat adapters are kept, so peak RSS includes all of them.
        calls.append(f"cat{len(calls)}")
        model.add_weighted_adapter(names, weights=weights, adapter_name=calls[-1], combination_type="cat")
    return merge, (f"PEFT add_weighted_adapter(combination_type='cat'), {len(MODULES)} modules; base "
                   f"Linear weights allocated but never written, so not resident")


def case_flexlora() -> tuple[Callable[[], object], str]:
    updates, flexlora = client_updates(), get_aggregator("flexlora")
    return (lambda: flexlora.aggregate(updates)), (
        f"FlexLoRA().aggregate (stack, factored SVD, 10 client truncations) over {len(MODULES)} modules; "
        f"time ÷ {len(MODULES)}")


def case_dense_svd() -> tuple[Callable[[], object], str]:
    updates = client_updates()
    stacked = stack(updates, example_shares())[MODULES[0]]
    dense = stacked.delta()
    del updates
    return ((lambda: torch.linalg.svd(dense, full_matrices=False)),
            f"torch.linalg.svd of one dense {DIM}×{DIM} float32 update (forming it not timed)")


def fedit_round() -> tuple[list[ClientUpdate], dict[str, LoraFactors]]:
    """The clients' updates (all of rank 16: FedIT averages only equal ranks) and FedIT's average of them."""
    updates = [ClientUpdate({m: LoraFactors(f.A[:16], f.B[:, :16], ALPHA / 16) for m, f in u.factors.items()},
                            u.num_examples, u.client_id)
               for u in client_updates() if u.factors[MODULES[0]].rank >= 16]
    return updates, get_aggregator("fedit").aggregate(updates).factors


def case_error_factored() -> tuple[Callable[[], object], str]:
    updates, averaged = fedit_round()
    shares = [u.num_examples / sum(v.num_examples for v in updates) for u in updates]

    def measure():
        exact = FactoredSum()
        for update, share in zip(updates, shares):
            exact.add(update.factors, share)
        return relative_error(FactoredSum().add(averaged), exact)
    return measure, (f"aggregation_error of a FedIT round of {len(updates)} rank-16 clients, factored "
                     f"(fedlora.aggregation.error), {len(MODULES)} modules")


def case_error_dense() -> tuple[Callable[[], object], str]:
    updates, averaged = fedit_round()
    shares = [u.num_examples / sum(v.num_examples for v in updates) for u in updates]

    def measure():
        error = target = 0.0
        for module in MODULES:
            exact = sum(share * update.factors[module].delta(torch.float64) for update, share in zip(updates, shares))
            error += float((averaged[module].delta(torch.float64) - exact).square().sum())
            target += float(exact.square().sum())
        return (error / target) ** 0.5
    return measure, f"the same error from dense float64 {DIM}×{DIM} updates, module by module"


# name: (builder, repeats, divide time by)
CASES = {
    "torch_cat": (case_torch_cat, 7, 1),
    "flora": (case_flora, 7, 1),
    "flora_stack": (case_flora_stack, 7, 1),
    "peft_cat": (case_peft_cat, 3, 1),
    "flexlora": (case_flexlora, 3, len(MODULES)),
    "dense_svd": (case_dense_svd, 2, 1),
    "error_factored": (case_error_factored, 3, 1),
    "error_dense": (case_error_dense, 1, 1),
}

# glibc malloc settings for the subprocess. "reused": freed memory stays in the heap, so
# repeats recycle pages (steady state of a loop). "fresh": every large tensor is a new mmap
# whose pages fault in on first write (a server allocating its result once per round).
MEMORY = {"reused": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)},
          "fresh": {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}}

MEASUREMENTS = [("torch_cat", "reused"), ("flora", "reused"), ("flora_stack", "reused"),
                ("torch_cat", "fresh"), ("flora", "fresh"), ("flora_stack", "fresh"),
                ("peft_cat", "reused"), ("flexlora", "reused"), ("dense_svd", "reused"),
                ("error_factored", "reused"), ("error_dense", "reused")]

# label, numerator, denominator, goal
RATIOS = [
    *((f"FLoRA{part} ÷ bare torch.cat, {memory} memory", f"{case}, {memory}", f"torch_cat, {memory}", 1.5)
      for case, part in (("flora", ""), ("flora_stack", " stacking alone")) for memory in MEMORY),
    ("FLoRA ÷ PEFT cat", "flora, reused", "peft_cat, reused", 0.2),
    ("factored FlexLoRA SVD ÷ dense SVD, per module", "flexlora, reused", "dense_svd, reused", 0.05),
    ("factored aggregation error ÷ dense, per round", "error_factored, reused", "error_dense, reused", 0.2),
]


def run_case(name: str, threads: int) -> dict:
    """Build the case's inputs, time its operation ``repeats`` times, report seconds and memory."""
    torch.set_num_threads(threads)
    build, repeats, divisor = CASES[name]
    operation, description = build()
    setup_rss = current_rss_mb()
    cpu, wall = [], []
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        result = operation()
        cpu.append((time.process_time() - start_cpu) / divisor)
        wall.append((time.perf_counter() - start_wall) / divisor)
        del result
    return {"name": name, "description": description, "repeats": repeats, "cpu": cpu, "wall": wall,
            "setup_rss_mb": setup_rss,
            "peak_rss_mb": peak_rss_mb()}


def report(results: dict[str, dict], threads: int, load_at_start: float) -> str:
    lines = [
        "# Aggregation benchmark",
        "",
        environment_line(threads, load_at_start) + "; every measurement uses these threads",
        "",
        f"Llama-7B-shaped adapters: {LAYERS} layers × ({', '.join(PROJECTIONS)}), {DIM}×{DIM}, "
        f"{len(RANKS)} clients with ranks {', '.join(map(str, RANKS))} (ΣR = {sum(RANKS)}), random float32.",
        "Each row runs in its own subprocess; peak RSS is that process's `ru_maxrss` (inputs included),",
        "RSS after setup is its VmRSS once the inputs are built. Times are per call, single-threaded;",
        "CPU time (`time.process_time`) is the primary measure because the machine is shared and wall",
        "time also counts the time other processes hold the cores. Every call is timed, the first included.",
        "Memory regimes (glibc malloc settings of the subprocess): *reused* keeps freed memory in the heap",
        "so repeats recycle pages; *fresh* maps new pages for every large tensor, which fault in on first",
        "write, as for a result allocated once per round. Generated by `benchmarks/aggregation.py`.",
        "",
        *markdown_table(["measurement", "repeats", "CPU min s", "CPU median s", "wall median s",
                         "RSS after setup MB", "peak RSS MB", "what is timed"],
                        ([name, result["repeats"], f"{min(result['cpu']):.4f}",
                          f"{statistics.median(result['cpu']):.4f}", f"{statistics.median(result['wall']):.4f}",
                          f"{result['setup_rss_mb']:.0f}", f"{result['peak_rss_mb']:.0f}", result["description"]]
                         for name, result in results.items()), align="lrrrrrrl"),
        "",
    ]
    rows = []
    for label, numerator, denominator, goal in RATIOS:
        ratios = [summary(results[numerator][key]) / summary(results[denominator][key])
                  for key, summary in (("cpu", statistics.median), ("cpu", min), ("wall", statistics.median))]
        rows.append([label, *(f"{ratio:.3f}" for ratio in ratios), f"≤ {goal}", "yes" if ratios[0] <= goal else "no"])
    lines += markdown_table(["ratio", "CPU medians", "CPU mins", "wall medians", "goal", "met (CPU medians)"],
                            rows, align="lrrrrl")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, help="run one measurement and print it as JSON (internal)")
    # One thread by default: on a small shared machine OpenMP threads spin against other
    # processes and small ops become erratic; every measurement uses the same setting.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.threads)))
        return
    load_at_start = os.getloadavg()[0]
    results = {}
    for name, memory in MEASUREMENTS:
        print(f"measuring {name}, {memory} memory …", file=sys.stderr, flush=True)
        results[f"{name}, {memory}"] = measure_in_subprocess(__file__, ["--case", name, "--threads", str(args.threads)],
                                                             env=MEMORY[memory])
    table = report(results, args.threads, load_at_start)
    write_result(RESULTS_FILE, table)
    print(table)


if __name__ == "__main__":
    main()
