"""QLoRA: runs on a quantised base, tiny-llama loaded in 4 or 8 bits by bitsandbytes in-process.

The quantised weights stay as loaded; every merge goes into the full-precision residual beside
each quantised linear. Tested like every exactness claim, against float64, for every method, and
through checkpoints, resume, Flower replicas, both exports and DP-SGD.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from fedlora import cli
from fedlora.aggregation import ClientPlan, LoraFactors, aggregator_class, available_aggregators
from fedlora.data import Record, collate, tokenize_records
from fedlora.engine.checkpoint import load_latest_checkpoint
from fedlora.engine.client import LocalTrainer
from fedlora.engine.config import ConfigError, build_config, save_config
from fedlora.engine.dp_sgd import private_steps
from fedlora.engine.inputs import load_run_model
from fedlora.engine.metrics import read_metrics
from fedlora.engine.restore import restore_global_model
from fedlora.engine.setup import prepare_run
from fedlora.engine.task import ClientTask
from fedlora.lora import (attach_lora, base_layer, load_merged_state, merge_factors, merged_state, remove_lora,
                          set_trainable)
from fedlora.lora.residual import MergedResidual, is_quantized, residual_of
from fedlora.models import load_model, pad_token_id
from fedlora.quantization import Quantization
from fedlora.runtime.flower.client_app import ReplicaLog
from fedlora.runtime.inprocess import run_inprocess

from support import DOLLY, comparable, run_on_in_memory_flower, run_tiny, tiny_config

COMPARED = ("round", "eval_loss", "train_loss", "bytes_up", "bytes_down", "clients", "rejected")
TARGETS = ["q_proj", "v_proj"]


def quantized_setup(client_dir: Path, out: Path, **overrides):
    config = tiny_config(client_dir, out, **{"quantization": "nf4", "rounds": 3, **overrides})
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    return prepare_run(config, out, log=lambda message: None)


def run(client_dir: Path, out: Path, **overrides) -> list[dict]:
    run_inprocess(quantized_setup(client_dir, out, **overrides))
    return [{key: row.get(key) for key in COMPARED} for row in read_metrics(out)]


def dequantized(layer) -> torch.Tensor:
    """dequant(Q(W₀)) of a bitsandbytes layer, read without touching its state (PEFT's helper
    sets an int8 layer's row scales, after which its first forward pass fails)."""
    if layer.weight.dtype == torch.int8:  # its row scales move to the layer's state at its first forward pass
        scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(layer.weight.data, scales)
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def dense(factors: LoraFactors) -> torch.Tensor:
    return factors.scale * (factors.B.double().cpu() @ factors.A.double().cpu())


def random_factors(rank: int, d: int, n: int, seed: int, scale: float = 0.5) -> LoraFactors:
    generator = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(rank, n, generator=generator), torch.randn(d, rank, generator=generator), scale)


# --- the residual -------------------------------------------------------------------------------------

def test_updates_sharing_a_subspace_are_recompressed_to_their_exact_rank_and_cancelling_ones_vanish():
    residual, shared_A = MergedResidual(12, 10, "cpu"), random_factors(3, 12, 10, seed=0).A
    updates = [LoraFactors(shared_A, random_factors(3, 12, 10, seed=s).B, 0.5) for s in (1, 2, 3)]
    residual.add(updates[:1])
    assert torch.equal(residual.U, 0.5 * updates[0].B) and torch.equal(residual.V, shared_A)  # kept as given
    residual.add(updates[1:])
    assert residual.U.shape == (12, 3) and residual.V.shape == (3, 10)  # stacked: 9 columns, rank 3
    reference = sum(dense(update) for update in updates)
    assert (residual.delta().double() - reference).norm() <= 1e-6 * reference.norm()

    undone, independent = MergedResidual(12, 10, "cpu"), [random_factors(2, 12, 10, seed) for seed in (4, 5)]
    undone.add(independent)
    assert undone.U.shape == (12, 4)
    undone.add([LoraFactors(u.A, -u.B, u.scale) for u in independent])  # the same updates, subtracted
    assert undone.empty


def test_factors_that_would_outgrow_the_matrix_become_dense_and_stay_exact():
    residual, reference = MergedResidual(8, 6, "cpu"), torch.zeros(8, 6, dtype=torch.float64)
    for seed in range(4):  # width 2, then 4: 4 × (8 + 6) ≥ 8 × 6
        update = random_factors(2, 8, 6, seed)
        residual.add([update])
        reference += dense(update)
        assert (residual.dense is not None) == (seed >= 1)
        assert (residual.delta().double() - reference).norm() <= 1e-6 * reference.norm()
    x = torch.randn(3, 6)
    torch.testing.assert_close(residual(x), (x.double() @ reference.T).float(), rtol=1e-6, atol=1e-6)


def test_a_residual_state_loads_back_bit_for_bit_and_a_wrong_one_is_refused():
    for updates in ([random_factors(2, 8, 6, 0)], [random_factors(2, 8, 6, s) for s in range(3)]):
        residual = MergedResidual(8, 6, "cpu")
        residual.add(updates)
        loaded = MergedResidual(8, 6, "cpu")
        loaded.load(residual.state())
        assert residual.state().keys() == loaded.state().keys()
        assert all(torch.equal(a, b) for a, b in zip(residual.state().values(), loaded.state().values()))
    with pytest.raises(ValueError, match="do not make a 8×6 matrix"):
        MergedResidual(8, 6, "cpu").load({"U": torch.zeros(8, 2), "V": torch.zeros(2, 5)})


def test_a_quantised_layer_adds_its_residual_to_its_output_also_under_a_lora_adapter():
    model, _ = load_model("tiny-llama", quantization=Quantization("nf4"))
    name = "model.layers.0.self_attn.q_proj"
    layer = base_layer(model, name)
    update = random_factors(4, 64, 64, seed=5, scale=0.01)
    weight = dequantized(layer).double()
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        plain = layer(x)
        # the weights as loaded: dequantised for the matmul, not repacked (quantization.keep_as_loaded)
        torch.testing.assert_close(plain, (x.double() @ weight.T).float(), rtol=1e-6, atol=1e-6)
        saved = merged_state(model, [name])
        merge_factors(model, {name: update})
        expected = (x.double() @ (weight + dense(update)).T).float()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        peft_model = attach_lora(model, 2, 4, TARGETS)  # B = 0: the adapter adds nothing yet
        try:
            wrapped = peft_model.get_base_model().get_submodule(name)
            assert wrapped is not layer
            torch.testing.assert_close(wrapped(x), expected, rtol=1e-5, atol=1e-5)
        finally:
            remove_lora(peft_model)
    load_merged_state(model, saved)
    assert residual_of(layer).empty


# --- whole runs -----------------------------------------------------------------------------------------

METHODS = [(method, "nf4") for method in available_aggregators()] + [("flora", "fp4"), ("flora", "int8")]


@pytest.mark.parametrize("method, quantization", METHODS)
def test_every_method_merges_into_the_residual_exactly_and_never_into_the_quantised_weights(
        client_dir, tmp_path, device, method, quantization):
    ranks = [4, 2, 1] if aggregator_class(method).heterogeneous_ranks else [2]
    setup = quantized_setup(client_dir, tmp_path / method, device=device, method=method, ranks=ranks,
                            quantization=quantization)
    global_model = setup.federation.global_model
    layers = {name: base_layer(global_model.model, name) for name in global_model.adapted_modules}
    packed = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    start = {name: dequantized(layer).double().cpu() for name, layer in layers.items()}
    applied, apply = [], global_model.apply

    def recorded(update):
        applied.append(update)
        apply(update)

    global_model.apply = recorded
    run_inprocess(setup)
    assert len(applied) == 3
    merged_somewhere = False
    for name, layer in layers.items():
        assert torch.equal(layer.weight, packed[name]), f"{name}: the quantised weight changed"
        merged = torch.zeros_like(start[name])  # Σ of what every round merged, in float64
        for update in applied:
            parts = [update.factors[name]] if update.merge else []
            parts += [update.residual[name]] if name in update.residual else []
            for factors in parts:
                merged += dense(factors)
        residual = residual_of(layer)
        if merged.norm() == 0:
            assert residual.empty, name
            continue
        merged_somewhere = True
        effective = dequantized(layer).double().cpu() + residual.delta().double().cpu()
        error = (effective - (start[name] + merged)).norm() / merged.norm()
        assert error <= 1e-5, (name, error.item())
        # and the layer computes that weight: its own output, plus x·Rᵀ
        x = torch.randn(4, layer.in_features, device=device)
        with torch.no_grad():
            quantised_only = type(layer).forward(layer, x)  # the class's forward: no hooks
            torch.testing.assert_close(layer(x) - quantised_only,
                                       (x.double().cpu() @ merged.T).float().to(device), rtol=1e-4, atol=1e-5)
    assert merged_somewhere == bool(setup.federation.ledger.merges), method


@pytest.mark.parametrize("method", ["flora", "fedex"])  # merged stacks; a residual beside a global adapter
def test_resume_of_a_quantised_run_reproduces_the_uninterrupted_run_bit_for_bit(client_dir, tmp_path, device, method):
    options = {"method": method, "clients_per_round": 2, "device": device,
               "ranks": [4, 2, 1] if method == "flora" else [2]}
    full = run(client_dir, tmp_path / "full", **options)
    run(client_dir, tmp_path / "split", rounds=1, **options)
    resumed = run(client_dir, tmp_path / "split", **options)
    assert resumed == full
    (_, uninterrupted), (_, continued) = (load_latest_checkpoint(tmp_path / name) for name in ("full", "split"))
    assert sorted(continued) == sorted(uninterrupted)
    assert any(".merged_residual." in key for key in uninterrupted)
    for key, tensor in uninterrupted.items():
        assert torch.equal(continued[key], tensor), key


def test_flower_server_and_every_replica_equal_the_in_process_run_bit_for_bit(client_dir, tmp_path, server_identity):
    settings = {"quantization": "nf4", "method": "fedex", "ranks": [2], "rounds": 3, "fraction": 2 / 3,
                "local_steps": 1, "min_clients": 1}
    expected = run_tiny(client_dir, tmp_path / "inprocess", **settings)
    config = tiny_config(client_dir, tmp_path / "flower", runtime="flower", **settings)
    run_on_in_memory_flower(config, tmp_path / "nodes")
    assert comparable(read_metrics(tmp_path / "flower")) == comparable(expected)

    server = restore_global_model(tmp_path / "flower").global_model
    reference = restore_global_model(tmp_path / "inprocess").global_model.adapted_weights()
    assert any(".merged_residual." in key for key in reference)
    assert server.adapted_weights().keys() == reference.keys()
    assert all(torch.equal(server.adapted_weights()[key], tensor) for key, tensor in reference.items())
    for node in range(3):  # each node's replica, rebuilt from its log as its ClientApp does
        model, tokenizer = load_run_model(config)
        trainer = LocalTrainer(model, pad_token_id(tokenizer), target_modules=TARGETS, batch_size=2)
        ReplicaLog(tmp_path / "nodes" / str(node) / "run-1").replay(trainer)
        replica = merged_state(trainer.model, server.adapted_modules)
        assert all(torch.equal(replica[key], tensor) for key, tensor in reference.items()), node


def test_export_merged_is_the_dequantised_base_plus_the_residual_and_the_adapter_loads_on_the_quantised_base(
        client_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_tiny(client_dir, run_dir, quantization="nf4", rounds=2)  # FLoRA, ranks 4, 2, 1: residuals of rank 14
    restored = restore_global_model(run_dir)
    model = restored.global_model.model
    layers = {name: base_layer(model, name) for name in restored.global_model.adapted_modules}
    expected = {name: dequantized(layer).double() + residual_of(layer).delta().double()
                for name, layer in layers.items()}
    tokens = torch.tensor([[1, 17, 42, 99, 7]])
    with torch.no_grad():
        quantised_logits = model(tokens).logits

    runner = CliRunner()
    merged = runner.invoke(cli.app, ["export", str(run_dir), "--merged", str(tmp_path / "merged")],
                           catch_exceptions=False)
    assert merged.exit_code == 0, merged.output
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(type(module) is torch.nn.Linear for name, module in plain.named_modules() if name.endswith("_proj"))
    for name, weight in expected.items():
        torch.testing.assert_close(plain.get_submodule(name).weight.double(), weight, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, quantised_logits, rtol=0, atol=1e-4)
    assert "dequantised from nf4" in (tmp_path / "merged" / "README.md").read_text()

    adapter = runner.invoke(cli.app, ["export", str(run_dir), "--adapter", str(tmp_path / "adapter"), "--rank", "16"],
                            catch_exceptions=False)
    assert adapter.exit_code == 0, adapter.output
    error = float(" ".join(adapter.output.split()).split("accumulated update: ")[1].split()[0])
    assert error < 1e-5  # rank 16 holds a rank-14 residual
    base, _ = load_run_model(restored.config)  # the same quantised base, as loaded
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    q_proj = loaded.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoraLayer) and is_quantized(q_proj.get_base_layer())
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, quantised_logits, rtol=0, atol=1e-4)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'" in card


def test_dp_sgd_on_a_quantised_base_steps_by_the_clipped_per_example_gradients():
    model, tokenizer = load_model("tiny-llama", quantization=Quantization("nf4"))
    pad = pad_token_id(tokenizer)
    records = [Record(f"Question {i}: name a colour.", "", f"Answer {i}: " + "red green blue " * (i + 1))
               for i in range(5)]
    examples, _ = tokenize_records(tokenizer, records, 48)
    merge_factors(model, {"model.layers.1.self_attn.v_proj": random_factors(4, 32, 64, seed=3, scale=0.05)})

    def lora():
        peft_model = attach_lora(model, 8, 16, TARGETS, seed=1)
        set_trainable(peft_model, {"A", "B"})
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        return peft_model, [p for p in peft_model.parameters() if p.requires_grad]

    peft_model, params = lora()
    try:
        grads = [torch.autograd.grad(peft_model(**collate([example], pad)).loss, params) for example in examples]
    finally:
        remove_lora(peft_model)
    norms = [float(torch.sqrt(sum(g.double().square().sum() for g in grad))) for grad in grads]
    clip = sorted(norms)[2]  # the median: some examples clipped, some not
    peft_model, params = lora()
    try:
        before = [p.detach().clone() for p in params]
        task = ClientTask(client_id="0", server_round=1, plan=ClientPlan(rank=8), alpha=16, init_seed=0, data_seed=0,
                          local_steps=1, dp_noise_multiplier=0.0, dp_max_grad_norm=clip, dp_noise_seed=0)
        private_steps(peft_model, torch.optim.SGD(params, lr=1.0), task, examples, pad_token_id=pad, batch_size=2,
                      grad_accum=3)
        after = [p.detach().clone() for p in params]
    finally:
        remove_lora(peft_model)
    for i, (start, end) in enumerate(zip(before, after)):
        clipped = sum(grad[i].double() * min(1.0, clip / norm) for grad, norm in zip(grads, norms))
        torch.testing.assert_close(end.double(), start.double() - clipped / len(examples), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("values, message", [
    ({"quantization": "int4"}, "'quantization' must be one of 'nf4', 'fp4', 'int8'"),
    ({"quantization": "int8", "double_quantization": True}, "'double_quantization' is an option of 4-bit"),
    ({"quantization_compute_dtype": "bfloat16"}, "'quantization_compute_dtype' is an option of 4-bit"),
])
def test_quantisation_options_that_do_not_fit_are_config_errors_naming_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values)


def test_a_quantised_run_without_bitsandbytes_says_what_to_install(monkeypatch):
    from fedlora.engine import config

    real = config.find_spec
    monkeypatch.setattr(config, "find_spec", lambda name: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ConfigError, match=r"pip install 'fedlora\[quantization\]'"):
        build_config({"quantization": "nf4"})


def test_a_sweep_loads_its_model_again_for_another_quantisation():
    from fedlora.sweep.runner import ModelCache

    variants = ({}, {"quantization": "nf4"}, {"quantization": "nf4", "double_quantization": True},
                {"quantization": "nf4", "quantization_compute_dtype": "bfloat16"}, {"quantization": "int8"})
    assert len({ModelCache.key_of(build_config(values)) for values in variants}) == len(variants)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_a_quantised_run_keeps_everything_on_the_gpu_it_is_given(client_dir, tmp_path):
    device = f"cuda:{torch.cuda.device_count() - 1}"
    setup = quantized_setup(client_dir, tmp_path / "run", device=device, rounds=1)
    run_inprocess(setup)
    for name in setup.federation.global_model.adapted_modules:
        layer = base_layer(setup.model, name)
        assert str(layer.weight.device) == str(residual_of(layer).U.device) == device, name


def test_a_quantised_model_counts_its_parameters_as_full_fine_tuning_would_train_them():
    from fedlora.engine.global_model import GlobalModel

    quantised, _ = load_model("tiny-llama", quantization=Quantization("nf4"))
    plain, _ = load_model("tiny-llama")
    assert GlobalModel(quantised, []).total_params() == sum(p.numel() for p in plain.parameters())


@pytest.mark.slow
@pytest.mark.skipif(not DOLLY.is_dir(), reason=f"the shared Dolly data is not at {DOLLY}")
def test_federated_qlora_on_smollm2_in_nf4_lowers_the_held_out_loss(smollm2_cache, tmp_path):
    rows = run_tiny(DOLLY, tmp_path / "run", model="smollm2-135m", quantization="nf4", rounds=2, clients=2,
                    local_steps=3, batch_size=4, ranks=[8], max_length=64, lr=3e-3, test_limit=16, mmlu_limit=0,
                    validation_fraction=0.001)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.01, [row["eval_loss"] for row in rows]
