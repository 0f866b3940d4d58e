"""Whole runs with bfloat16 base weights: FLoRA against float64, resume, every method.

bfloat16 is what a GPU run uses by default; here it runs on every device the machine has
(the CPU always). Learning rates are small, so most merged updates lie below half a bfloat16
step of the weights they go into: merged naively they would vanish, and only the merge carry
keeps them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora.aggregation import aggregator_class, available_aggregators
from fedlora.engine.checkpoint import load_latest_checkpoint
from fedlora.engine.config import build_config, save_config
from fedlora.engine.setup import prepare_run
from fedlora.lora import base_weight
from fedlora.models import load_model
from fedlora.engine.metrics import read_metrics
from fedlora.runtime.inprocess import run_inprocess

COMPARED = ("round", "eval_loss", "train_loss", "bytes_up", "bytes_down", "clients", "rejected")


def bf16_setup(client_dir: Path, out: Path, device: str, **overrides):
    values = {"model": "tiny-llama", "device": device, "dtype": "bfloat16", "data": str(client_dir),
              "rounds": 3, "local_steps": 2, "batch_size": 2, "max_length": 48, "ranks": [4, 2, 1],
              "lr": 1e-4, "out": str(out), **overrides}
    config = build_config(values)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    return prepare_run(config, out, log=lambda message: None)


def run(client_dir: Path, out: Path, device: str, **overrides) -> list[dict]:
    run_inprocess(bf16_setup(client_dir, out, device, **overrides))
    return [{key: row.get(key) for key in COMPARED} for row in read_metrics(out)]


def half_step(values: torch.Tensor) -> torch.Tensor:
    """Half the spacing of bfloat16 numbers around each value (8 significant bits)."""
    exponent = torch.floor(torch.log2(values.abs().clamp(min=torch.finfo(torch.bfloat16).tiny)))
    return torch.exp2(exponent - 8)


def test_flora_global_model_in_bfloat16_is_the_float64_sum_of_every_client_update(client_dir, tmp_path, device):
    setup = bf16_setup(client_dir, tmp_path / "run", device)
    pristine = {name: w.double().cpu() for name, w in setup.federation.global_model.adapted_weights().items()}
    rounds: dict[int, list] = {}
    train = setup.trainer.train

    def recorded(task, examples, on_step=None):
        result = train(task, examples, on_step=on_step)
        rounds.setdefault(task.server_round, []).append(result.update)
        return result

    setup.trainer.train = recorded
    run_inprocess(setup)
    global_model = setup.federation.global_model
    assert sorted(rounds) == [1, 2, 3]

    for name, start in pristine.items():
        reference, naive = start.clone(), start.to(torch.bfloat16)
        for updates in rounds.values():  # Σ_k p_k s_k B_k A_k per round, float64, from the raw factors
            total = sum(update.num_examples for update in updates)
            delta = sum((update.num_examples / total) * update.factors[name].scale
                        * (update.factors[name].B.double().cpu() @ update.factors[name].A.double().cpu())
                        for update in updates)
            reference += delta
            naive = (naive.float() + delta.float()).to(torch.bfloat16)  # merging without a carry
        weight, carry = base_weight(global_model.model, name), global_model.carry[name]
        assert weight.dtype == torch.bfloat16 and carry.dtype == torch.float32
        assert weight.device.type == carry.device.type == device
        weight, carry = weight.cpu(), carry.cpu()
        change = (reference - start).norm().item()
        # the weight plus its carry holds the whole sum to float32 accuracy ...
        kept_error = ((weight.double() + carry.double()) - reference).norm().item()
        assert kept_error <= 1e-3 * change, (name, kept_error, change)
        # ... the weight itself is the sum rounded once to bfloat16 ...
        slack = 4 * torch.finfo(torch.float32).eps * reference.abs()
        beyond = int(((weight.double() - reference).abs() > half_step(reference) + slack).sum())
        assert beyond == 0, f"{name}: {beyond} weights are further than half a bfloat16 step from the sum"
        # ... and without the carry most of the updates would have been lost
        naive_error = (naive.double() - reference).norm().item()
        assert naive_error > 0.5 * change, (name, naive_error, change)


def test_resume_in_bfloat16_reproduces_the_uninterrupted_run_bit_for_bit(client_dir, tmp_path, device):
    full = run(client_dir, tmp_path / "full", device, clients_per_round=2)
    run(client_dir, tmp_path / "split", device, rounds=1, clients_per_round=2)
    resumed = run(client_dir, tmp_path / "split", device, clients_per_round=2)
    assert resumed == full
    (_, uninterrupted), (_, continued) = (load_latest_checkpoint(tmp_path / name) for name in ("full", "split"))
    assert sorted(continued) == sorted(uninterrupted)
    assert any(key.startswith("model/carry/") for key in uninterrupted)
    for key, tensor in uninterrupted.items():
        assert torch.equal(continued[key], tensor), key


@pytest.mark.parametrize("method", [name for name in available_aggregators() if name != "flora"])
def test_every_method_runs_in_bfloat16(client_dir, tmp_path, device, method):
    ranks = [4, 2, 1] if aggregator_class(method).heterogeneous_ranks else [2]
    setup = bf16_setup(client_dir, tmp_path / method, device, method=method, ranks=ranks, rounds=2, lr=1e-2)
    run_inprocess(setup)
    rows = [row.to_json() for row in setup.federation.rows]
    assert all(torch.isfinite(torch.tensor(row["eval_loss"])) for row in rows)
    assert not any(row["rejected"] or row["skipped"] for row in rows), rows
    assert rows[-1]["eval_loss"] != rows[0]["eval_loss"]
    if not setup.federation.ledger.merges:  # nothing merged: an adapter went in for evaluation only
        pristine, _ = load_model("tiny-llama", device=device, dtype="bfloat16")
        for name in setup.federation.shapes:
            assert torch.equal(base_weight(setup.model, name), base_weight(pristine, name)), name
