"""Every tensor path keeps the device and dtype it is given: aggregation, merging, checkpoints, codec.

Tests run on every device the machine has (``device`` fixture: the CPU always, CUDA where
present). On the CPU alone they hold the dtypes; on a GPU they also catch a tensor made on
the CPU and mixed with the inputs, and compare the GPU's numbers with the CPU's.
"""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.aggregation import ClientUpdate, GlobalUpdate, LoraFactors, aggregator_class, available_aggregators
from fedlora.aggregation.factors import CORE, FACTOR_NAMES, RunContext
from fedlora.engine.checkpoint import load_latest_checkpoint, save_checkpoint
from fedlora.lora import base_weight, merge_update
from fedlora.models import load_model

D, N = 12, 10
MODULES = ("m0", "m1")
DTYPES = [torch.float32, torch.float64]


def make_updates(method: str, device: str, dtype: torch.dtype) -> list[ClientUpdate]:
    """Three clients' updates that ``method`` accepts: mixed ranks where it allows them, the
    factor it keeps frozen (FFA-LoRA, RoLoRA in round 1, RAVAN's bases) shared by every client,
    and the core it trains (RAVAN's H, one head)."""
    generator = torch.Generator().manual_seed(len(method))
    ranks = RANKS if aggregator_class(method).heterogeneous_ranks else (3, 3, 3)
    trainable = aggregator_class(method)().trainable(1)
    frozen = set(FACTOR_NAMES) - trainable
    shared = {module: (torch.randn(3, N, generator=generator), torch.randn(D, 3, generator=generator))
              for module in MODULES}
    updates = []
    for index, rank in enumerate(ranks):
        factors = {}
        for module in MODULES:
            A = shared[module][0] if "A" in frozen else torch.randn(rank, N, generator=generator)
            B = shared[module][1] if "B" in frozen else torch.randn(D, rank, generator=generator)
            H = torch.randn(1, rank, rank, generator=generator).to(device, dtype) if CORE in trainable else None
            factors[module] = LoraFactors(A.to(device, dtype), B.to(device, dtype), scale_of(ranks, rank), H)
        updates.append(ClientUpdate(factors, num_examples=10 * (index + 1), client_id=f"c{index}"))
    return updates


RANKS = (4, 2, 3)


def scale_of(ranks: tuple[int, ...], rank: int) -> float:
    return 2.0 if len(set(ranks)) == 1 else 8.0 / rank


def set_up(method: str):
    """``method`` told of the run as the engine tells it: the clients' ranks and scales, the shapes."""
    aggregator = aggregator_class(method)()
    ranks = RANKS if aggregator.heterogeneous_ranks else (3, 3, 3)
    aggregator.setup(RunContext(ranks={f"c{i}": r for i, r in enumerate(ranks)},
                                scales={f"c{i}": scale_of(ranks, r) for i, r in enumerate(ranks)},
                                shapes=dict.fromkeys(MODULES, (D, N))))
    return aggregator


def tensors_of(update: GlobalUpdate) -> list[torch.Tensor]:
    groups = [update.factors, update.residual, *update.client_factors.values()]
    return [tensor for group in groups for factors in group.values() for tensor in (factors.A, factors.B)]


def on_cpu(updates: list[ClientUpdate]) -> list[ClientUpdate]:
    return [ClientUpdate({m: LoraFactors(f.A.cpu().double(), f.B.cpu().double(), f.scale,
                                         None if f.H is None else f.H.cpu().double())
                          for m, f in u.factors.items()}, u.num_examples, u.client_id) for u in updates]


def assert_kept(update: GlobalUpdate, device: str, dtype: torch.dtype) -> None:
    tensors = tensors_of(update)
    assert tensors
    assert {(t.device.type, t.dtype) for t in tensors} == {(device, dtype)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", available_aggregators())
def test_aggregation_stays_on_the_inputs_device_and_dtype(method, dtype, device):
    updates = make_updates(method, device, dtype)
    aggregator = set_up(method)
    result = aggregator.aggregate(updates, server_round=1)
    assert_kept(result, device, dtype)
    reference = aggregator.aggregate(on_cpu(updates), server_round=1)  # float64 on the CPU
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    for module in result.modules:
        expected, actual = reference.delta(module, torch.float64), result.delta(module, torch.float64).cpu()
        if not expected.any():  # a global product of zero (FedSA-LoRA: each client keeps its B): its A
            expected, actual = reference.factors[module].A, result.factors[module].A.double().cpu()
        error = (actual - expected).norm() / expected.norm()
        assert error <= tolerance, (module, error.item())

    # a client that did not report, and one whose rank exceeds the global's (fresh components)
    for client_id, rank in (("new", 1), ("new", 6)):
        start = aggregator.client_start(result, client_id, rank)
        if start:  # None or {}: a fresh LoRA
            assert {(f.A.device.type, f.B.device.type, f.A.dtype) for f in start.values()} == {(device, device, dtype)}


@pytest.mark.parametrize("method", available_aggregators())
def test_accumulated_aggregation_stays_on_the_inputs_device(method, device):
    updates = make_updates(method, device, torch.float32)
    aggregator = set_up(method)
    # one more slot than updates: a client that never reports is cut out of FLoRA's stack
    slots = [(u.client_id, {m: f.rank for m, f in u.factors.items()}) for u in updates]
    accumulator = aggregator.accumulator([slots[0], ("absent", slots[0][1]), *slots[1:]])
    for update in reversed(updates):
        accumulator.add(update)
    result = accumulator.result(server_round=1)
    assert_kept(result, device, torch.float32)
    expected = aggregator.aggregate(updates, server_round=1)
    for module in result.modules:
        assert torch.allclose(result.delta(module), expected.delta(module), atol=1e-5), module


def test_merge_forms_cpu_factors_on_the_weights_device_in_bfloat16(device):
    model, _ = load_model("tiny-llama", device=device, dtype="bfloat16")
    name = "model.layers.0.self_attn.q_proj"
    weight = base_weight(model, name)
    before = weight.detach().double().cpu()
    generator = torch.Generator().manual_seed(0)
    factors = LoraFactors(1e-3 * torch.randn(2, weight.shape[1], generator=generator),
                          1e-3 * torch.randn(weight.shape[0], 2, generator=generator), scale=0.5)  # on the CPU
    carry = merge_update(model, GlobalUpdate({name: factors}, merge=True))
    assert weight.dtype == torch.bfloat16 and weight.device.type == device
    assert carry[name].dtype == torch.float32 and carry[name].device.type == device
    # the update, far below bfloat16's resolution, is kept to float32's
    merged = weight.detach().double().cpu() + carry[name].double().cpu()
    expected = before + factors.delta(torch.float64)
    error = (merged - expected).norm().item()
    assert error <= 2 * torch.finfo(torch.float32).eps * before.norm().item() < (expected - before).norm().item()


def test_delta_is_computed_in_the_dtype_and_on_the_device_asked(device):
    factors = LoraFactors(torch.ones(2, 3, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64), scale=0.5)
    delta = factors.delta(torch.float32, device)
    assert (delta.dtype, delta.device.type) == (torch.float32, device)
    assert torch.equal(delta.cpu(), torch.ones(4, 3))
    update = GlobalUpdate({"m": factors}, merge=True, residual={"m": factors})
    assert torch.equal(update.delta("m", torch.float32, device).cpu(), 2 * torch.ones(4, 3))


def test_checkpoint_tensors_load_onto_the_device_asked(tmp_path, device):
    tensors = {"base/w": torch.randn(3, 4).to(torch.bfloat16), "carry/w": torch.randn(3, 4)}
    save_checkpoint(tmp_path, 1, {"completed_round": 1}, {k: v.to(device) for k, v in tensors.items()})
    _, loaded = load_latest_checkpoint(tmp_path, device=device)
    for key, tensor in tensors.items():
        assert (loaded[key].device.type, loaded[key].dtype) == (device, tensor.dtype)
        assert torch.equal(loaded[key].cpu(), tensor)
    _, on_cpu_by_default = load_latest_checkpoint(tmp_path)
    assert {t.device.type for t in on_cpu_by_default.values()} == {"cpu"}


def test_flower_codec_sends_device_factors_as_cpu_float32(device):
    pytest.importorskip("flwr")
    from fedlora.runtime.flower.wire import factors_from_records, factors_to_records

    factors = {"m": LoraFactors(torch.randn(2, 5).to(device, torch.bfloat16), torch.randn(4, 2).to(device),
                                scale=1.5)}
    decoded = factors_from_records(*factors_to_records(factors))["m"]
    assert (decoded.A.device.type, decoded.A.dtype, decoded.B.dtype) == ("cpu", torch.float32, torch.float32)
    assert torch.equal(decoded.A, factors["m"].A.float().cpu()) and torch.equal(decoded.B, factors["m"].B.cpu())
    assert decoded.scale == 1.5


def test_cli_device_options_reach_the_run_and_a_device_torch_cannot_use_is_a_one_line_error(client_dir, tmp_path):
    from typer.testing import CliRunner

    from fedlora import cli

    def run(*flags: str, out: str):
        args = ["run", "--model", "tiny-llama", "--data", client_dir, "--rounds", "1", "--local-steps", "1",
                "--batch-size", "2", "--max-length", "32", "--ranks", "2", "--out", tmp_path / out, *flags]
        return CliRunner().invoke(cli.app, [str(arg) for arg in args], catch_exceptions=False)

    result = run("--device", "cpu", "--dtype", "bfloat16", "--gradient-checkpointing", "--autocast", "bfloat16",
                 out="options")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "options" / "config.json").read_text())
    assert {key: saved[key] for key in ("device", "dtype", "gradient_checkpointing", "autocast")} == {
        "device": "cpu", "dtype": "bfloat16", "gradient_checkpointing": True, "autocast": "bfloat16"}

    unknown = run("--device", "gpu0", out="unknown")
    assert unknown.exit_code == 2 and "device 'gpu0' is not a torch device" in unknown.output
    if not torch.cuda.is_available():
        missing = run("--device", "cuda", out="missing")
        assert missing.exit_code == 2 and "sees no CUDA GPU" in " ".join(missing.output.split())
        assert "Traceback" not in missing.output


def test_a_cuda_device_beyond_the_gpus_this_process_sees_is_refused_before_loading(monkeypatch):
    from fedlora.models import ModelError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ModelError, match=r"device 'cuda:2': this process sees 2 CUDA GPUs, cuda:0 to cuda:1 "
                                         r"\(CUDA_VISIBLE_DEVICES=4,5\)"):
        load_model("tiny-llama", device="cuda:2")
