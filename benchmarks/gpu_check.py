"""The GPU check of issue 19, for a machine with a CUDA GPU: results in benchmarks/results/gpu.md.

(1) the fast test suite with the default device (CUDA there; tests that need Flower are left out
    where Flower is not installed);
(2) FLoRA merges into bfloat16 weights on the GPU against a float64 reference on the CPU: the
    merge carry must keep updates far below bfloat16's resolution;
(3) client step time, fedlora's LocalTrainer ÷ a bare PEFT + AdamW loop on the same batches
    (padded, and packed where this fedlora packs), on a TinyLlama-1.1B-shaped model;
(4) one 10-client heterogeneous FLoRA round (ranks 64,32,16,16,8,8,4,4,4,4) on a Llama-7B-shaped
    bfloat16 model: peak GPU memory against its parts, and aggregation time on the GPU and the CPU;
(5) QLoRA: a client's training on a TinyLlama-1.1B-shaped and a Llama-7B-shaped model with its
    base in bfloat16 and in NF4 (bitsandbytes): the base's GPU memory, the peak, the step time.

Models are built from their configs with random weights (the GPU machine downloads nothing);
client data is synthetic Dolly-style records of varied length. Each part runs in its own
subprocess with a share of one deadline (under 7 minutes in all): a part that fails or runs out
of time is reported as such and the others still run, and the report is rewritten after every
part, so what was measured survives a kill; ``--parts`` reruns some of them into a report of
their own (the test suite runs last, with the time the others left: ``--parts tests`` gives it
its whole share). Run through ``benchmarks/gpu_check.sh``.

``--dry-run`` runs every part at tiny shapes on whatever device there is (the CPU on a machine
without a GPU) and only two test functions, to check this script end to end; its report goes to
a temporary file (or ``--report``), never to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import ast
import gc
import importlib.util
import inspect
import itertools
import json
import math
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from common import RESULTS, markdown_table
from fedlora.runtime.observer import RunObserver

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_SECONDS = 400  # the machine is lent for minutes: all parts inside 6.7, leaving room for a rerun
#: the order parts run in (the report shows them (1)–(5)) and the most seconds each may take
PARTS = {"merges": 60, "round": 150, "step": 100, "qlora": 90, "tests": 240}
RANKS_7B = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
TARGETS = ["q_proj", "v_proj"]
SEED = 0

# model shapes: (what it is, LlamaConfig keyword arguments)
LLAMA_7B = ("Llama-7B-shaped", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                    max_position_embeddings=4096, rms_norm_eps=1e-5))
TINYLLAMA_1B = ("TinyLlama-1.1B-shaped", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                              num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                                              max_position_embeddings=2048, rms_norm_eps=1e-5))
TINY = ("tiny (dry run)", dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))


def sizes(dry_run: bool) -> dict:
    """Every size the parts use: the real ones, or tiny ones for a dry run."""
    if dry_run:
        return {"merge_shape": (48, 40), "merge_modules": 2, "merge_rounds": 3, "merge_ranks": [8, 4, 2],
                "step_model": TINY, "step_batch": 2, "step_max_length": 64, "step_steps": 4, "step_pairs": 1,
                "round_model": TINY, "round_ranks": [16, 8, 4, 4, 2, 2, 1, 1, 1, 1], "round_batch": 2,
                "round_max_length": 64, "round_steps": 1, "aggregation_repeats": 2,
                "qlora_models": [TINY], "qlora_batch": 2, "qlora_max_length": 64, "qlora_steps": 4}
    return {"merge_shape": (4096, 4096), "merge_modules": 8, "merge_rounds": 12, "merge_ranks": RANKS_7B,
            "step_model": TINYLLAMA_1B, "step_batch": 8, "step_max_length": 512, "step_steps": 8, "step_pairs": 3,
            "round_model": LLAMA_7B, "round_ranks": RANKS_7B, "round_batch": 4, "round_max_length": 512,
            "round_steps": 2, "aggregation_repeats": 5,
            "qlora_models": [TINYLLAMA_1B, LLAMA_7B], "qlora_batch": 4, "qlora_max_length": 512, "qlora_steps": 6}


# --- shared helpers ------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls, the device synchronised around each."""
    seconds = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        function()
        synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds


def gib(count: float) -> float:
    return count / 2**30


def shaped_model(shape: tuple[str, dict], device: str, dtype: torch.dtype):
    """A randomly initialised Llama of ``shape``, built on ``device`` in ``dtype``, and the
    byte-level tokenizer of fedlora's tiny-llama (its ids fit any vocabulary above 259)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fedlora.models import load_model

    _, tokenizer = load_model("tiny-llama", device="cpu")
    config = LlamaConfig(**shape[1], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), tokenizer


def synthetic_records(count: int, seed: int) -> list[dict]:
    """Dolly-style records of varied length: byte-level tokens, 170–512 with the prompt template, so
    that at max_length 512 about a fifth of a batch of 8 is padding and a fifth of records are cut."""
    rng = random.Random(seed)
    words = "the a federated model learns from clients whose data never leaves them while updates do".split()
    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))
    return [{"instruction": text(3, 15), "context": text(5, 40) if i % 3 == 0 else "", "response": text(2, 50),
             "category": rng.choice(["open_qa", "summarization", "brainstorming"])} for i in range(count)]


def lora_state_bytes(rank: int, shapes: dict[str, tuple[int, int]]) -> int:
    """A client's LoRA training state in float32: factors, gradients and AdamW's two moments."""
    return 4 * 4 * rank * sum(d + n for d, n in shapes.values())


# --- (2) FLoRA merges in bfloat16 against float64 --------------------------------------------------


def part_merges(dry_run: bool) -> dict:
    """Rounds of heterogeneous FLoRA updates, each far below half a bfloat16 step of the weights,
    merged on the GPU with the carry; the float64 reference sums the clients' raw products."""
    from torch import nn

    from fedlora.aggregation import ClientUpdate, LoraFactors, get_aggregator
    from fedlora.lora import merge_update

    size = sizes(dry_run)
    device, (d, n) = default_device(), size["merge_shape"]
    generator = torch.Generator().manual_seed(SEED)
    names = [f"m{i}" for i in range(size["merge_modules"])]
    start = {name: (0.02 * torch.randn(d, n, generator=generator)).to(torch.bfloat16) for name in names}
    layers = nn.ModuleDict({name: nn.Linear(n, d, bias=False) for name in names}).to(device, torch.bfloat16)
    with torch.no_grad():
        for name in names:
            layers[name].weight.copy_(start[name])
    reference = {name: start[name].double() for name in names}
    naive = {name: start[name].to(device) for name in names}
    ranks, carry, merge_seconds = size["merge_ranks"], {}, []
    flora = get_aggregator("flora")
    for merge_round in range(size["merge_rounds"]):
        rng = random.Random(merge_round)
        updates, sizes_k = [], [rng.randint(50, 500) for _ in ranks]
        for client, (rank, examples) in enumerate(zip(ranks, sizes_k)):
            # ΔW_k entries of about 1e-5; half a bfloat16 step of a 0.02 weight is 6e-5
            factors = {name: LoraFactors(torch.randn(rank, n, generator=generator) / math.sqrt(n),
                                         1e-5 * torch.randn(d, rank, generator=generator), scale=2.0)
                       for name in names}
            for name, f in factors.items():
                reference[name] += (examples / sum(sizes_k)) * f.scale * (f.B.double() @ f.A.double())
            updates.append(ClientUpdate({name: LoraFactors(f.A.to(device), f.B.to(device), f.scale)
                                         for name, f in factors.items()}, examples, f"c{client}"))
        global_update = flora.aggregate(updates)
        merge_seconds += timed(lambda: merge_update(layers, global_update, carry), 1)  # carry: updated in place
        for name in names:  # what merging without a carry would keep
            naive[name] = (naive[name].float() + global_update.delta(name, torch.float32)).to(torch.bfloat16)
    rows = []
    for name in names:
        weight, module_carry, ref = layers[name].weight.detach().cpu(), carry[name].cpu(), reference[name]
        change = (ref - start[name].double()).norm().item()
        exponent = torch.floor(torch.log2(ref.abs().clamp(min=torch.finfo(torch.bfloat16).tiny)))
        half_step = torch.exp2(exponent - 8)
        rows.append({"module": name, "change": change,
                     "kept_error": ((weight.double() + module_carry.double()) - ref).norm().item() / change,
                     "max_error_in_half_steps": ((weight.double() - ref).abs() / half_step).max().item(),
                     "naive_error": (naive[name].cpu().double() - ref).norm().item() / change,
                     "carry_device": str(carry[name].device), "weight_dtype": str(weight.dtype)})
    return {"device": device, "shape": [d, n], "modules": len(names), "rounds": size["merge_rounds"],
            "ranks": ranks, "rows": rows, "merge_seconds": merge_seconds}


# --- (3) client step time ---------------------------------------------------------------------------


class StepClock:
    """Wall time after every optimizer step, the device synchronised first."""

    def __init__(self):
        self.marks = [self.now()]

    @staticmethod
    def now() -> float:
        synchronize()
        return time.perf_counter()

    def __call__(self, *_) -> None:
        self.marks.append(self.now())

    def step_seconds(self, warmup: int) -> float:
        timed_marks = self.marks[warmup:]
        return (timed_marks[-1] - timed_marks[0]) / (len(timed_marks) - 1)


def peft_adamw_loop(model, batches, pad_id: int, rank: int, lr: float, clock: StepClock):
    """The reference: get_peft_model, torch AdamW over the batches on the model's device, unwrap."""
    from peft import LoraConfig, TaskType, get_peft_model

    from fedlora.data import collate

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                        task_type=TaskType.CAUSAL_LM)
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    device = next(model.parameters()).device
    peft_model.train()
    for batch in batches:
        peft_model(**{key: value.to(device) for key, value in collate(batch, pad_id).items()}).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock()
    peft_model.eval()
    return peft_model.unload()


def packing_parameter() -> str | None:
    """The LocalTrainer parameter that switches packing, where this fedlora has one."""
    from fedlora.engine.client import LocalTrainer

    return next((name for name in inspect.signature(LocalTrainer.__init__).parameters if "pack" in name), None)


def part_step(dry_run: bool) -> dict:
    from fedlora.data import Record, tokenize_records
    from fedlora.engine.client import LocalTrainer, batch_stream
    from fedlora.aggregation import ClientPlan
    from fedlora.engine.task import ClientTask

    size, rank, lr, warmup = sizes(dry_run), 16, 3e-4, 2
    device = default_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # fedlora's default on each
    model, tokenizer = shaped_model(size["step_model"], device, dtype)
    steps, batch_size = size["step_steps"], size["step_batch"]
    records = [Record(r["instruction"], r["context"], r["response"])
               for r in synthetic_records(steps * batch_size, seed=1)]
    examples, _ = tokenize_records(tokenizer, records, size["step_max_length"])
    task = ClientTask(client_id="0", server_round=1, plan=ClientPlan(rank=rank), alpha=2 * rank, init_seed=0,
                      data_seed=0, local_steps=steps)
    batches = list(itertools.islice(batch_stream(examples, batch_size, task.data_seed), steps))
    pad_id = tokenizer.pad_token_id
    packing = packing_parameter()
    trainers = {"fedlora (padded)": LocalTrainer(model, pad_id, target_modules=TARGETS, batch_size=batch_size,
                                                 lr=lr, **({packing: False} if packing else {}))}
    if packing:
        trainers["fedlora (packed)"] = LocalTrainer(model, pad_id, target_modules=TARGETS, batch_size=batch_size,
                                                    lr=lr, **{packing: True})
    state = {"model": model}

    def fedlora_trial(trainer) -> float:
        clock = StepClock()
        trainer.model = state["model"]
        trainer.train(task, examples, on_step=clock)
        state["model"] = trainer.model
        return clock.step_seconds(warmup)

    def peft_trial() -> float:
        clock = StepClock()
        state["model"] = peft_adamw_loop(state["model"], batches, pad_id, rank, lr, clock)
        return clock.step_seconds(warmup)

    arms = {name: (lambda trainer=trainer: fedlora_trial(trainer)) for name, trainer in trainers.items()}
    arms["bare PEFT (padded)"] = peft_trial
    for arm in arms.values():  # warm-up round, not timed: kernels, allocator, caches
        arm()
    trials: dict[str, list[float]] = {name: [] for name in arms}
    peaks: dict[str, int] = {}
    for _ in range(size["step_pairs"]):  # interleaved, so drift affects every arm alike
        for name, arm in arms.items():
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            trials[name].append(arm())
            if torch.cuda.is_available():
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
    real_tokens = sum(len(e.input_ids) for batch in batches for e in batch) / len(batches)
    padded_tokens = sum(max(len(e.input_ids) for e in batch) * len(batch) for batch in batches) / len(batches)
    return {"model": size["step_model"][0], "device": device, "dtype": str(dtype).removeprefix("torch."),
            "params": sum(p.numel() for p in model.parameters()), "rank": rank, "batch": batch_size,
            "max_length": size["step_max_length"], "steps": steps, "warmup": warmup, "trials": trials,
            "peak_bytes": peaks, "real_tokens_per_step": real_tokens, "padded_tokens_per_step": padded_tokens,
            "packing_parameter": packing}


# --- (4) a 10-client FLoRA round on a Llama-7B-shaped model -----------------------------------------


def write_clients(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for client in range(count):
        records = synthetic_records(12 + 4 * client, seed=100 + client)
        (folder / f"local_training_{client}.json").write_text(json.dumps(records))
    (folder / "global_test.json").write_text(json.dumps(synthetic_records(4, seed=99)))
    return folder


class MemoryWatch(RunObserver):
    """Peak allocated GPU memory over a whole run, and each client's own peak within it."""

    def __init__(self):
        self.peak = 0
        self.clients: list[dict] = []
        self._training: tuple[str, int, int] | None = None  # the client training: (id, rank, memory before)

    def fold(self) -> None:
        if torch.cuda.is_available():
            synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    def client_started(self, task) -> None:
        self.fold()
        before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        self._training = (task.client_id, task.plan.rank, before)

    def client_finished(self, result) -> None:
        synchronize()
        client, rank, before = self._training
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        self.clients.append({"client": client, "rank": rank, "before": before, "peak": peak})
        self.fold()


def random_updates(shapes: dict[str, tuple[int, int]], ranks: list[int], device: str):
    from fedlora.aggregation import ClientUpdate, LoraFactors

    generator = torch.Generator().manual_seed(SEED)
    return [ClientUpdate({name: LoraFactors(torch.randn(rank, n, generator=generator).to(device),
                                            torch.randn(d, rank, generator=generator).to(device), 2.0)
                          for name, (d, n) in shapes.items()}, 10 + client, f"c{client}")
            for client, rank in enumerate(ranks)]


def run_variant(model, tokenizer, model_dir: Path, data: Path, size: dict, checkpointing: bool,
                folder: Path) -> dict:
    """One FLoRA round through fedlora's engine on ``model``; its memory and times. The adapted
    weights are put back afterwards, so the next variant starts from the same model."""
    from fedlora.api import execute
    from fedlora.engine.checkpoint import load_latest_checkpoint, with_prefix
    from fedlora.engine.config import build_config, save_config
    from fedlora.engine.global_model import GlobalModel
    from fedlora.engine.inputs import check_model_fits

    run_dir = folder / f"run-{checkpointing}"
    values = {"model": str(model_dir), "device": default_device(), "dtype": "bfloat16", "data": str(data),
              "method": "flora", "ranks": size["round_ranks"], "rounds": 1, "local_steps": size["round_steps"],
              "batch_size": size["round_batch"], "max_length": size["round_max_length"], "test_limit": 4,
              "gradient_checkpointing": checkpointing, "seed": SEED, "out": str(run_dir)}
    config = build_config(values, source="gpu check")
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / "config.json")
    global_model = GlobalModel(model, check_model_fits(config))
    shapes = {name: tuple(weight.shape) for name, weight in global_model.adapted_weights().items()}
    pristine = {name: weight.cpu() for name, weight in global_model.adapted_weights().items()}  # not on the GPU
    watch = MemoryWatch()
    watch.fold()
    started = time.perf_counter()
    result = execute(config, run_dir, [watch], loaded=(model, tokenizer))
    seconds = time.perf_counter() - started
    watch.fold()
    row = result.rows[-1].to_json()
    _, tensors = load_latest_checkpoint(run_dir)
    carry_bytes = sum(c.numel() * c.element_size() for c in with_prefix("model/carry/", tensors).values())
    global_model.load_adapted_weights(pristine)
    measured = torch.cuda.is_available() and bool(watch.clients)
    activations = [c["peak"] - c["before"] - lora_state_bytes(c["rank"], shapes) for c in watch.clients]
    return {"gradient_checkpointing": checkpointing, "seconds": seconds, "client_seconds": row["client_seconds"],
            "server_seconds": row["server_seconds"], "eval_loss": row.get("eval_loss"), "peak_bytes": watch.peak,
            "carry_bytes": carry_bytes, "clients": watch.clients,
            "activation_bytes_max": max(activations) if measured else None, "shapes": shapes}


def part_round(dry_run: bool) -> dict:
    from fedlora.aggregation import get_aggregator
    from fedlora.lora import merge_update

    size = sizes(dry_run)
    device = default_device()
    model, tokenizer = shaped_model(size["round_model"], device, torch.bfloat16)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ranks = size["round_ranks"]
    variants, aggregation = [], {}
    with tempfile.TemporaryDirectory(prefix="fedlora-gpu-") as folder:
        model_dir = Path(folder) / "model"
        model.config.save_pretrained(model_dir)  # fedlora reads the module shapes from it
        data = write_clients(Path(folder) / "clients", len(ranks))
        for checkpointing in (False, True):
            variants.append(run_variant(model, tokenizer, model_dir, data, size, checkpointing, Path(folder)))
            gc.collect()  # the finished federation's carry and stack, before the next one is measured
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        shapes = [variant.pop("shapes") for variant in variants][-1]
        # aggregation of ten uploads of these shapes on the GPU and on the CPU, and the merge
        flora = get_aggregator("flora")
        updates = random_updates(shapes, ranks, device)
        repeats = size["aggregation_repeats"]
        aggregation[device] = timed(lambda: flora.aggregate(updates), repeats)
        if device != "cpu":
            on_cpu = random_updates(shapes, ranks, "cpu")
            aggregation["cpu"] = timed(lambda: flora.aggregate(on_cpu), max(2, repeats // 2))
            del on_cpu
        global_update = flora.aggregate(updates)
        carry: dict = {}
        merge_seconds = timed(lambda: merge_update(model, global_update, carry), 2)
    stack_bytes = 4 * sum(ranks) * sum(d + n for d, n in shapes.values())
    module_bytes = 4 * max(d * n for d, n in shapes.values())
    return {"model": size["round_model"][0], "device": device, "params": sum(p.numel() for p in model.parameters()),
            "model_bytes": model_bytes, "modules": len(shapes), "ranks": ranks, "batch": size["round_batch"],
            "max_length": size["round_max_length"], "local_steps": size["round_steps"],
            "lora_state_bytes_largest": lora_state_bytes(max(ranks), shapes), "stack_bytes": stack_bytes,
            "module_fp32_bytes": module_bytes, "variants": variants, "aggregation_seconds": aggregation,
            "merge_seconds": merge_seconds,
            "reserved_peak_bytes": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None}


# --- (5) QLoRA: NF4 against bfloat16 ----------------------------------------------------------------


def to_nf4(model, compute_dtype: torch.dtype) -> None:
    """Every decoder linear of ``model`` replaced by a bitsandbytes NF4 layer holding its weights,
    the layer transformers' loader makes of it (the LM head stays as it is): a model built from
    its config, whose random weights no file holds, quantised in memory on its device."""
    import bitsandbytes as bnb
    from torch import nn

    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.endswith("lm_head"):
            continue
        device = module.weight.device
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=False, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=False,
                                         quant_type="nf4", module=layer).to(device)  # quantised here
        model.set_submodule(name, layer)


def state_bytes(model) -> int:
    """The model's tensors once each (tied weights share storage), quantisation constants included."""
    return sum({tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
                for tensor in model.state_dict().values()}.values())


def part_qlora(dry_run: bool) -> dict:
    from fedlora.attention import enable_packing
    from fedlora.data import Record, tokenize_records
    from fedlora.engine.client import LocalTrainer
    from fedlora.aggregation import ClientPlan
    from fedlora.engine.task import ClientTask
    from fedlora.quantization import keep_as_loaded

    size, rank, warmup, device = sizes(dry_run), 16, 2, default_device()
    steps, batch_size = size["qlora_steps"], size["qlora_batch"]
    task = ClientTask(client_id="0", server_round=1, plan=ClientPlan(rank=rank), alpha=2 * rank, init_seed=0,
                      data_seed=0, local_steps=steps)
    runs = []
    for shape in size["qlora_models"]:
        for base in ("bfloat16", "nf4"):
            model, tokenizer = shaped_model(shape, device, torch.bfloat16)
            if base == "nf4":
                to_nf4(model, torch.bfloat16)
                keep_as_loaded(model)  # as fedlora's loader does (on a CPU with AVX512-BF16 it matters)
            records = [Record(r["instruction"], r["context"], r["response"])
                       for r in synthetic_records(steps * batch_size, seed=2)]
            examples, _ = tokenize_records(tokenizer, records, size["qlora_max_length"])
            trainer = LocalTrainer(model, tokenizer.pad_token_id, target_modules=TARGETS, batch_size=batch_size,
                                   lr=3e-4, packing=enable_packing(model))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
            clock = StepClock()
            trainer.train(task, examples, on_step=clock)
            runs.append({"model": shape[0], "base": base, "params": sum(p.numel() for p in model.parameters()),
                         "state_bytes": state_bytes(model), "resident_bytes": resident,
                         "peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                         "step_seconds": clock.step_seconds(warmup)})
            del model, trainer
    return {"device": device, "rank": rank, "batch": batch_size, "max_length": size["qlora_max_length"],
            "steps": steps, "warmup": warmup, "runs": runs}


# --- (1) the fast test suite ------------------------------------------------------------------------


def imports_flower(path: Path, seen: set[Path] | None = None) -> bool:
    """Whether a test module imports Flower at its top level, itself or through a test module it imports."""
    seen = seen or set()
    seen.add(path)
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                   else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for module in modules:
            if module.split(".")[0] == "flwr" or module.startswith("fedlora.runtime.flower"):
                return True
            sibling = path.parent / f"{module}.py"
            if module.startswith("test_") and sibling.is_file() and sibling not in seen \
                    and imports_flower(sibling, seen):
                return True
    return False


def part_tests(dry_run: bool, timeout: float, log: Path) -> dict:
    have_flower = importlib.util.find_spec("flwr") is not None
    test_files = sorted((ROOT / "tests").glob("test_*.py"))
    left_out = [] if have_flower else [f.name for f in test_files if imports_flower(f)]
    command = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", "-rfEs",
               *(f"--ignore=tests/{name}" for name in left_out)]
    if importlib.util.find_spec("pytest_timeout"):
        command += ["--timeout", "150"]
    workers = min(8, os.cpu_count() or 1)
    if importlib.util.find_spec("xdist") and workers > 1 and not dry_run:
        command += ["-n", str(workers)]
    if dry_run:  # the whole suite is not for a shared 2-core machine: two tests show the plumbing
        command += ["tests/test_devices.py", "-k", "checkpoint or delta"]
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                   env=checkout_environment())
        output, returncode = completed.stdout + completed.stderr, completed.returncode
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        returncode = None
    log.write_text(output, encoding="utf-8")
    summary = next((line.strip("= ") for line in reversed(output.splitlines())
                    if re.search(r"\d+ (passed|failed|error)", line)), "no summary (timed out?)")
    problems = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return {"command": shlex.join(command[1:]), "returncode": returncode, "summary": summary,
            "problems": problems, "left_out_for_flower": left_out, "seconds": time.perf_counter() - started,
            "device_default": default_device(), "log": log.name}


# --- orchestration and report ---------------------------------------------------------------------


def environment() -> dict:
    import peft
    import transformers

    info = {"date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_gib=round(gib(properties.total_memory), 1),
                    capability=f"{properties.major}.{properties.minor}",
                    bf16=torch.cuda.is_bf16_supported())
    try:  # fedlora.data needs datasets and flwr-datasets, which gpu_check.sh installs from .whl/
        importlib.import_module("fedlora.engine.setup")
        info["imports"] = "ok"
    except ImportError as error:
        info["imports"] = f"{type(error).__name__}: {error}"
    for package in ("datasets", "pyarrow", "flwr", "bitsandbytes"):
        spec = importlib.util.find_spec(package)
        info[package] = importlib.import_module(package).__version__ if spec else "not installed"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown (no git here)"
    return info


def checkout_environment() -> dict[str, str]:
    """This process's environment with this checkout's fedlora first, wherever it was started from."""
    paths = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def run_part(name: str, dry_run: bool, timeout: float, log_dir: Path) -> dict:
    """One part in its own subprocess (its GPU memory its own); its last stdout line is its JSON."""
    if name == "tests":
        return part_tests(dry_run, timeout, log_dir / "tests.log")
    command = [sys.executable, __file__, "--part", name, *(["--dry-run"] if dry_run else [])]
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                   env=checkout_environment())
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within its {timeout:.0f} s"}
    (log_dir / f"{name}.log").write_text(completed.stdout + completed.stderr, encoding="utf-8")
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {completed.returncode}: {last}"}
    return {**json.loads(completed.stdout.strip().splitlines()[-1]), "seconds": time.perf_counter() - started}


def cells(values: list[float], digits: int = 4) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


def failed(result: dict | None) -> list[str] | None:
    if result is None:
        return ["not run: no time was left"]
    if "error" in result:
        return [f"**failed**: {result['error']} (log: {result.get('log', 'see the part log')})"]
    return None


def tests_section(result: dict) -> list[str]:
    outcome = result["summary"] if result["returncode"] is not None else f"timed out after {result['seconds']:.0f} s"
    lines = [f"Default device: {result['device_default']}. Command: `python {result['command']}`. "
             f"{result['seconds']:.0f} s.", "", f"**Result: {outcome}**", ""]
    if result["left_out_for_flower"]:
        lines += ["Left out because Flower is not installed here (they import it): "
                  + ", ".join(f"`{name}`" for name in result["left_out_for_flower"]) + ".", ""]
    if result["problems"]:
        lines += ["Failures and errors:", "", *(f"- `{line}`" for line in result["problems"][:40]), ""]
    return lines


def merges_section(result: dict) -> list[str]:
    d, n = result["shape"]
    lines = [f"{result['modules']} modules of {d}×{n} bfloat16 weights (N(0, 0.02)) on {result['device']}; "
             f"{result['rounds']} rounds of FLoRA over {len(result['ranks'])} clients with ranks "
             f"{', '.join(map(str, result['ranks']))}, every update's entries about 1e-5 (half a bfloat16 step "
             "of a 0.02 weight is 6e-5), aggregated and merged on the device with the carry. Reference: "
             "the clients' raw products p_k s_k B_k A_k summed in float64 on the CPU. *kept error*: "
             "‖weight + carry − reference‖ / ‖reference − start‖ (goal ≤ 1e-3); *max error*: the largest "
             "|weight − reference| in half bfloat16 steps of the reference (goal ≤ 1: one rounding); "
             "*naive*: the same relative error of merging without a carry.", ""]
    rows = [[r["module"], f"{r['change']:.3e}", f"{r['kept_error']:.2e}", f"{r['max_error_in_half_steps']:.3f}",
             f"{r['naive_error']:.3f}", r["carry_device"],
             "pass" if r["kept_error"] <= 1e-3 and r["max_error_in_half_steps"] <= 1.001 else "FAIL"]
            for r in result["rows"]]
    lines += markdown_table(["module", "‖update‖", "kept error", "max error (half steps)", "naive error",
                             "carry on", "check"], rows, align="lrrrrll") + [""]
    lines += [f"Merge time per round (all modules, on {result['device']}): {cells(result['merge_seconds'])} s "
              "(min / median / max).", ""]
    return lines


def step_section(result: dict) -> list[str]:
    lines = [f"{result['model']} model ({result['params'] / 1e9:.2f} B parameters, random weights) on "
             f"{result['device']} in {result['dtype']}; LoRA rank {result['rank']} on q_proj, v_proj; batch "
             f"{result['batch']}, max_length {result['max_length']}: {result['real_tokens_per_step']:.0f} real "
             f"tokens per step in {result['padded_tokens_per_step']:.0f} padded. The same {result['steps']} "
             f"batches (those LocalTrainer draws) in every trial; a trial's step time is its mean after "
             f"{result['warmup']} warm-up steps; one untimed round of every arm, then "
             f"{len(next(iter(result['trials'].values())))} interleaved rounds. fedlora: `LocalTrainer.train`; "
             "PEFT: `get_peft_model` + `torch.optim.AdamW` + `unload`.", ""]
    if result["packing_parameter"] is None:
        lines += ["Packing: this fedlora's `LocalTrainer` has no packing parameter, so only the padded path "
                  "is measured.", ""]
    peft = statistics.median(result["trials"]["bare PEFT (padded)"])
    rows = []
    for name, trials in result["trials"].items():
        median = statistics.median(trials)
        peak = result["peak_bytes"].get(name)
        rows.append([name, cells(trials), f"{median / peft:.3f}", f"{result['real_tokens_per_step'] / median:,.0f}",
                     f"{gib(peak):.2f}" if peak else "—"])
    lines += markdown_table(["arm", "step s (min / median / max)", "÷ PEFT (medians)", "real tokens / s",
                             "peak GiB"], rows) + [""]
    return lines


def round_section(result: dict) -> list[str]:
    lines = [f"{result['model']} model ({result['params'] / 1e9:.2f} B parameters, bfloat16, random weights) "
             f"on {result['device']}; FLoRA on q_proj, v_proj ({result['modules']} modules), ranks "
             f"{', '.join(map(str, result['ranks']))}; {result['local_steps']} local steps per client, batch "
             f"{result['batch']} × up to {result['max_length']} tokens of synthetic records; round 0 and 1 "
             "evaluated on 4 records and checkpointed, as in any run. Peak: `torch.cuda.max_memory_allocated` "
             "over the whole run.", ""]
    model, stack, module = result["model_bytes"], result["stack_bytes"], result["module_fp32_bytes"]
    for variant in result["variants"]:
        title = "with gradient checkpointing" if variant["gradient_checkpointing"] else "without gradient checkpointing"
        lines += [f"### {title}", ""]
        if variant["peak_bytes"] == 0:
            lines += [f"No CUDA here: memory not measured. Round {variant['seconds']:.1f} s.", ""]
            continue
        client_state = result["lora_state_bytes_largest"]
        activations = variant["activation_bytes_max"]
        training = model + stack + client_state + activations
        merging = model + stack + variant["carry_bytes"] + 3 * module
        expected = max(training, merging)
        rows = [["base model (bf16)", f"{gib(model):.2f}"],
                ["stacked global update (ΣR = " + str(sum(result["ranks"])) + ", fp32)", f"{gib(stack):.3f}"],
                [f"largest client's LoRA state (rank {max(result['ranks'])}: factors, grads, 2 AdamW moments, fp32)",
                 f"{gib(client_state):.3f}"],
                ["a client's activations (measured: its training peak − memory before − its LoRA state; max)",
                 f"{gib(activations):.2f}"],
                ["merge carry (fp32, after the merge)", f"{gib(variant['carry_bytes']):.2f}"],
                ["merge temporaries (3 dense fp32 modules)", f"{gib(3 * module):.3f}"],
                ["expected peak: max(training: model + stack + state + activations, merging: model + stack + "
                 "carry + temporaries)", f"{gib(expected):.2f}"],
                ["**measured peak**", f"**{gib(variant['peak_bytes']):.2f}**"],
                ["measured − expected", f"{gib(variant['peak_bytes'] - expected):+.2f}"]]
        lines += markdown_table(["part", "GiB"], rows) + [""]
        lines += [f"Round {variant['seconds']:.1f} s (clients {variant['client_seconds']:.1f} s, server "
                  f"{variant['server_seconds']:.2f} s); held-out loss {variant['eval_loss']:.4f}.", ""]
    aggregation = result["aggregation_seconds"]
    own = statistics.median(aggregation[result["device"]])
    rows = [[device, cells(seconds), f"{statistics.median(seconds) / own:.1f}"]
            for device, seconds in aggregation.items()]
    lines += ["### Aggregation and merge time", "",
              f"`FLoRA().aggregate` (input checks + stacking) of ten uploads of these shapes (random factors), "
              f"{result['modules']} modules:", ""]
    lines += markdown_table(["device", "seconds (min / median / max)", f"÷ {result['device']}"], rows) + [""]
    lines += [f"Merging that update into the bfloat16 model on {result['device']} (dense fp32 update + carry, "
              f"{result['modules']} modules): {cells(result['merge_seconds'])} s (first call allocates the carry).", ""]
    return lines


def qlora_section(result: dict) -> list[str]:
    lines = [f"A client's training through `LocalTrainer` on {result['device']}: LoRA rank {result['rank']} on "
             f"q_proj, v_proj, batch {result['batch']} × up to {result['max_length']} tokens of synthetic records, "
             f"{result['steps']} steps, the step time their mean after {result['warmup']}; models built from their "
             "configs with random weights. bfloat16: the base as fedlora loads it on a GPU; NF4: every decoder "
             "linear quantised by bitsandbytes (computing in bfloat16, no double quantisation), embedding, norms "
             "and LM head in bfloat16. *base*: GPU memory once the model is built, before training; *peak*: "
             "`torch.cuda.max_memory_allocated` over the training; *state*: the model's tensors.", ""]
    rows, bf16 = [], {run["model"]: run for run in result["runs"] if run["base"] == "bfloat16"}
    for run in result["runs"]:
        reference = bf16[run["model"]]
        gpu = run["peak_bytes"] is not None
        rows.append([run["model"], run["base"], f"{gib(run['state_bytes']):.2f}",
                     f"{gib(run['resident_bytes']):.2f}" if gpu else "—",
                     f"{gib(run['peak_bytes']):.2f}" if gpu else "—", f"{run['step_seconds']:.3f}",
                     f"{run['peak_bytes'] / reference['peak_bytes']:.2f}" if gpu else "—",
                     f"{run['step_seconds'] / reference['step_seconds']:.2f}"])
    lines += markdown_table(["model", "base", "state GiB", "base GiB", "peak GiB", "step s", "peak ÷ bf16",
                             "step ÷ bf16"], rows, align="llrrrrrr") + [""]
    return lines


SECTIONS = {"tests": ("(1) Fast test suite, default device", tests_section),
            "merges": ("(2) FLoRA merges into bfloat16 weights against float64", merges_section),
            "step": ("(3) Client step time: fedlora ÷ bare PEFT", step_section),
            "round": ("(4) One 10-client FLoRA round on a Llama-7B-shaped bfloat16 model", round_section),
            "qlora": ("(5) QLoRA: a client's training with an NF4 base against bfloat16", qlora_section)}


def section(title: str, result: dict | None, body) -> list[str]:
    """A part's heading, then what ``body`` makes of its result, or why there is none."""
    problem = failed(result)
    return [f"## {title}", "", *(problem + [""] if problem is not None else body(result))]


def report(info: dict, results: dict, chosen: list[str], dry_run: bool, wall: float) -> str:
    where = (f"{info['gpu']} ({info['gpu_memory_gib']} GiB, compute capability {info['capability']}, "
             f"bf16 {'yes' if info['bf16'] else 'no'})" if "gpu" in info else "no CUDA GPU (CPU only)")
    lines = ["# GPU check" + (" — DRY RUN at tiny shapes, not a GPU result" if dry_run else ""), "",
             f"{info['date']} · {where} · {info['cpus']} CPUs · torch {info['torch']} (CUDA {info['cuda']}), "
             f"transformers {info['transformers']}, peft {info['peft']}, Python {info['python']} · "
             f"fedlora {info['commit']} · datasets {info['datasets']}, pyarrow {info['pyarrow']}, "
             f"flwr {info['flwr']}, bitsandbytes {info['bitsandbytes']}", "",
             *([] if info["imports"] == "ok" else [f"**fedlora's engine does not import: {info['imports']}**", ""]),
             f"Command: `benchmarks/gpu_check.sh{' --dry-run' if dry_run else ''}"
             f"{'' if set(chosen) == set(PARTS) else ' --parts ' + ','.join(chosen)}`; {wall:.0f} s in all. "
             "Generated by `benchmarks/gpu_check.py`, which says what each part does.", ""]
    for name, (title, body) in SECTIONS.items():  # in the order (1)–(5)
        if name in chosen:
            lines += section(title, results.get(name), body)
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, any device, two tests")
    parser.add_argument("--part", choices=[p for p in PARTS if p != "tests"], help=argparse.SUPPRESS)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default: all, {','.join(PARTS)})")
    parser.add_argument("--report", type=Path, help="where to write the Markdown report")
    args = parser.parse_args()
    chosen = args.parts.split(",")
    if not set(chosen) <= set(PARTS):
        parser.error(f"--parts must name some of {', '.join(PARTS)}")
    if args.part:  # a subprocess of the run below
        result = {"merges": part_merges, "step": part_step, "round": part_round, "qlora": part_qlora}[args.part](
            args.dry_run)
        print(json.dumps(result))
        return
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None  # the device tool's folder that comes back
    log_dir = out or Path(tempfile.mkdtemp(prefix="fedlora-gpu-check-"))
    name = "gpu" if set(chosen) == set(PARTS) else "gpu-" + "-".join(chosen)
    target = args.report or (Path(tempfile.gettempdir()) / f"{name}-dry-run.md" if args.dry_run
                             else RESULTS / f"{name}.md")
    started, info, results = time.perf_counter(), environment(), {}
    text = report(info, results, chosen, args.dry_run, 0.0)
    for name, cap in PARTS.items():
        if name not in chosen:
            continue
        left = DEADLINE_SECONDS - (time.perf_counter() - started)
        if left < 20:
            break
        print(f"[{time.perf_counter() - started:5.0f} s] {name} (at most {min(cap, left):.0f} s)", flush=True)
        results[name] = run_part(name, args.dry_run, min(cap, left), log_dir)
        text = report(info, results, chosen, args.dry_run, time.perf_counter() - started)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        if out is not None:
            (out / target.name).write_text(text, encoding="utf-8")
            (out / target.with_suffix(".json").name).write_text(
                json.dumps({"environment": info, "results": results}, indent=1))
    print(text)
    print(f"report: {target}" + (f" and {out / target.name}" if out else "") + f"; logs in {log_dir}")


if __name__ == "__main__":
    main()
