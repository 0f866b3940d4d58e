"""Privacy benchmark: what DP costs in step time and in held-out loss, on SmolLM2 and the Dolly clients.

(a) Step time with sample-level DP-SGD ÷ without, on the same batches: a client holding exactly
    one batch of examples, so DP's Poisson batch (rate 1) and the plain batch are the same four
    examples every step. Both through ``LocalTrainer.train``, alternating plain, DP, plain, …
(b) Held-out loss at ε ≈ 1, 8 and ∞ (no DP) for FLoRA and FFA-LoRA on the 9 Dolly clients, with
    sample-level DP-SGD calibrated to the target (``dp = {target_epsilon, …}``), and FFA-LoRA with
    client-level DP-FedAvg at ε ≈ 8. SmolLM2 is loaded once and shared by the runs.

Run from the repository root: ``make bench-privacy``. Writes benchmarks/results/privacy.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import DOLLY, DOLLY_TEST, dolly_client_files, environment_line, markdown_table, require_shared_data, \
    run_federation, spread, spread_text, write_result
from perf import PAIRS, STEP_BATCH, STEP_LR, STEP_MODEL, STEP_RANK, STEP_TARGETS, STEPS_PER_TRIAL, WARMUP_STEPS, \
    StepClock

SEED = 0
STEP_MAX_LENGTH = 128  # (a): the length its results were measured at
DELTA = 1e-4  # below 1/N for every Dolly client (the smallest holds 826 records)
MAX_GRAD_NORM = 1.0
CLIP_NORM = 0.05  # client-level: the norm of one client's change of B over all modules
BUDGET = {"rounds": 2, "clients_per_round": 3, "local_steps": 3, "batch_size": 4, "max_length": 96,
          "test_limit": 16, "ranks": [8], "lr": 1e-3}
EPSILONS = (1.0, 8.0, None)  # None: no DP (ε = ∞)
SUMMARY_KEYS = {"dp": "privacy", "client_dp": "client_privacy"}  # each level's (ε, δ) in summary.json


def part_step() -> dict:
    from fedlora.data import load_records, tokenize_records
    from fedlora.engine.client import LocalTrainer
    from fedlora.aggregation import ClientPlan
    from fedlora.engine.task import ClientTask
    from fedlora.models import load_model, pad_token_id

    model, tokenizer = load_model(STEP_MODEL)
    records = load_records(dolly_client_files()[0])[:STEP_BATCH]
    examples, _ = tokenize_records(tokenizer, records, STEP_MAX_LENGTH)
    trainer = LocalTrainer(model, pad_token_id(tokenizer), target_modules=STEP_TARGETS, batch_size=STEP_BATCH,
                           lr=STEP_LR)
    plain = ClientTask(client_id="0", server_round=1, plan=ClientPlan(rank=STEP_RANK), alpha=2 * STEP_RANK,
                       init_seed=0, data_seed=0, local_steps=STEPS_PER_TRIAL)
    private = replace(plain, dp_noise_multiplier=1.0, dp_max_grad_norm=MAX_GRAD_NORM, dp_noise_seed=0)

    def trial(task: ClientTask) -> dict:
        clock = StepClock()
        trainer.train(task, examples, on_step=clock)
        return clock.trial()

    trial(plain), trial(private)  # warm-up pair, not timed
    trials = {"plain": [], "dp": []}
    for _ in range(PAIRS):
        trials["plain"].append(trial(plain))
        trials["dp"].append(trial(private))
    return {"trials": trials, "tokens": sum(len(e.input_ids) for e in examples)}


def part_quality(work: Path) -> list[dict]:
    from fedlora.engine.config import build_config
    from fedlora.engine.inputs import load_run_model

    base = {"model": "smollm2-135m", "data": str(DOLLY), "test_data": str(DOLLY_TEST),
            "mmlu_limit": 1, "seed": SEED, **BUDGET}  # the final round's MMLU cannot be turned off: one question
    loaded = load_run_model(build_config(base))
    runs = [(method, "dp", epsilon) for method in ("flora", "ffa") for epsilon in EPSILONS]
    runs.append(("ffa", "client_dp", 8.0))
    results = []
    for method, level, epsilon in runs:
        values = {**base, "method": method, "out": str(work / f"{method}-{level}-{epsilon}")}
        if epsilon is not None:
            clip = {"dp": {"max_grad_norm": MAX_GRAD_NORM}, "client_dp": {"clip_norm": CLIP_NORM}}[level]
            values[level] = {"target_epsilon": epsilon, "delta": DELTA, "seed": SEED, **clip}
        print(f"  {method} {level} ε={epsilon}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        rows, summary = run_federation(values, Path(values["out"]), loaded)
        key = SUMMARY_KEYS[level]
        spent = summary.get(key, {})
        results.append({"method": method, "level": level, "target": epsilon,
                        "sigma": summary.get("privacy_noise_multipliers", {}).get(key),
                        "max_epsilon": max((entry["epsilon"] for entry in spent.values()), default=None),
                        "start_loss": rows[0]["eval_loss"], "final_loss": rows[-1]["eval_loss"],
                        "seconds": time.perf_counter() - started})
    return results


def report(step: dict, quality: list[dict], load: float, minutes: float) -> str:
    trials = step["trials"]
    ratios = {key: [dp[key] / plain[key] for dp, plain in zip(trials["dp"], trials["plain"])]
              for key in ("step_cpu", "step_wall")}
    lines = ["# Privacy benchmark", "", environment_line(torch.get_num_threads(), load), "",
             f"Generated by `benchmarks/privacy.py` (`make bench-privacy`) in {minutes:.1f} min.", "",
             "## (a) Step time, DP-SGD ÷ plain, on the same batches", "",
             f"{STEP_MODEL}, LoRA rank {STEP_RANK} on {', '.join(STEP_TARGETS)}, AdamW lr {STEP_LR}; a client holding "
             f"exactly {STEP_BATCH} Dolly examples ({step['tokens']} tokens, max_length {STEP_MAX_LENGTH}), so "
             f"DP-SGD's Poisson batch (rate 1) and the plain batch are the same {STEP_BATCH} examples at every step. "
             f"DP: Opacus per-example gradients, clipping to {MAX_GRAD_NORM}, noise multiplier 1. "
             f"{STEPS_PER_TRIAL} steps per trial, the first {WARMUP_STEPS} not timed; one untimed warm-up pair, then "
             f"{PAIRS} pairs plain, DP, plain, … Seconds per step, min / median / max over trials.", "",
             *markdown_table(["arm", "step CPU s", "step wall s"],
                             [[arm, spread_text([t["step_cpu"] for t in trials[arm]]),
                               spread_text([t["step_wall"] for t in trials[arm]])] for arm in ("plain", "dp")]),
             "",
             *markdown_table(["ratio", "min", "median", "max"],
                             [[f"DP ÷ plain step ({key.split('_')[1]})", *(f"{v:.3f}" for v in spread(values))]
                              for key, values in ratios.items()]),
             "",
             "## (b) Held-out loss against ε", "",
             f"smollm2-135m on the 9 Dolly clients, rank {BUDGET['ranks'][0]}, {BUDGET['rounds']} rounds × "
             f"{BUDGET['clients_per_round']} sampled clients × {BUDGET['local_steps']} local steps, batch "
             f"{BUDGET['batch_size']}, max_length {BUDGET['max_length']}, lr {BUDGET['lr']}, seed {SEED}; held-out "
             f"loss on the first {BUDGET['test_limit']} records of `global_test.json`. Sample-level: DP-SGD with "
             f"max_grad_norm {MAX_GRAD_NORM}, σ calibrated before training so that every client's planned schedule "
             f"ends within the target ε (δ = {DELTA:g}); client-level: DP-FedAvg with clip_norm {CLIP_NORM}, "
             "σ calibrated likewise (one Gaussian mechanism per round a client joins, no amplification by "
             "client sampling). 'largest ε' is the largest spent by any client, from Opacus' RDP accountant.", "",
             *markdown_table(["method", "DP", "target ε", "σ", "largest ε spent", "loss round 0", "final loss",
                              "change", "wall s"],
                             [[r["method"], {"dp": "sample-level", "client_dp": "client-level"}[r["level"]]
                               if r["target"] is not None else "none",
                               "∞" if r["target"] is None else f"{r['target']:g}",
                               "—" if r["sigma"] is None else f"{r['sigma']:.3f}",
                               "∞" if r["max_epsilon"] is None else f"{r['max_epsilon']:.3f}",
                               f"{r['start_loss']:.4f}", f"{r['final_loss']:.4f}",
                               f"{r['final_loss'] - r['start_loss']:+.4f}", f"{r['seconds']:.0f}"] for r in quality]),
             ""]
    return "\n".join(lines)


def main() -> None:
    require_shared_data()
    # one thread, as in benchmarks/perf.py: on a small shared machine a second OpenMP thread
    # spins while another process holds the core, which inflates both arms' times unevenly
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    print("(a) step time", file=sys.stderr, flush=True)
    step = part_step()
    print("(b) held-out loss against ε", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as work:
        quality = part_quality(Path(work))
    text = report(step, quality, load, (time.perf_counter() - started) / 60)
    write_result("privacy.md", text)
    print(text)


if __name__ == "__main__":
    main()
