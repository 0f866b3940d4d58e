"""Adapters, merging and export on the tiny Llama: factors move exactly, updates merge exactly."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel

from fedlora.aggregation.factors import GlobalUpdate, LoraFactors
from fedlora.lora import (
    attach_lora,
    base_weight,
    get_factors,
    low_rank_adapter,
    merge_factors,
    merge_update,
    remove_lora,
    save_adapter,
    set_factors,
    set_trainable,
)
from fedlora.models import load_model

TARGETS = ["q_proj", "v_proj"]
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def tiny():
    return load_model("tiny-llama", dtype="float32")[0]  # on the default device (CUDA where present)


@pytest.fixture
def batch():
    tokenizer = load_model("tiny-llama")[1]
    return tokenizer(["federated low-rank adaptation", "ünïcödé"], return_tensors="pt", padding=True)


def random_factors(peft_model, seed: int, magnitude: float = 0.1) -> dict[str, LoraFactors]:
    """Non-zero factors shaped like the model's adapter, with the adapter's own scale, on its device."""
    generator = torch.Generator().manual_seed(seed)
    return {name: LoraFactors(A=magnitude * torch.randn(f.A.shape, generator=generator).to(f.A.device),
                              B=magnitude * torch.randn(f.B.shape, generator=generator).to(f.B.device),
                              scale=f.scale)
            for name, f in get_factors(peft_model).items()}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch.to(model.device)).logits


def test_factors_round_trip_with_transformers_module_names(tiny):
    peft_model = attach_lora(tiny, 4, 8, TARGETS)
    factors = random_factors(peft_model, seed=1)
    set_factors(peft_model, factors)
    read = get_factors(peft_model)
    assert set(read) == {f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS}
    for name, f in factors.items():
        assert torch.equal(read[name].A, f.A) and torch.equal(read[name].B, f.B)
        assert read[name].scale == 2.0 and read[name].A.dtype == torch.float32
    read[Q0].A.zero_()  # a detached copy: the adapter is untouched
    assert get_factors(peft_model)[Q0].A.abs().sum() > 0


def test_set_factors_with_another_scale_preserves_the_update(tiny):
    peft_model = attach_lora(tiny, 4, 8, TARGETS)
    factors = {name: LoraFactors(f.A, f.B, scale=0.5) for name, f in random_factors(peft_model, 2).items()}
    set_factors(peft_model, factors)
    read = get_factors(peft_model)
    for name, f in factors.items():
        assert read[name].scale == 2.0
        torch.testing.assert_close(read[name].delta(), f.delta(), rtol=1e-6, atol=1e-7)


def test_set_factors_rejects_a_wrong_shape_or_module_set(tiny):
    peft_model = attach_lora(tiny, 4, 8, TARGETS)
    factors = get_factors(peft_model)
    factors[Q0] = LoraFactors(torch.zeros(2, 64), torch.zeros(64, 2), 2.0)
    with pytest.raises(ValueError, match=Q0):
        set_factors(peft_model, factors)
    with pytest.raises(ValueError, match=Q0):
        set_factors(peft_model, {k: v for k, v in get_factors(peft_model).items() if k != Q0})


def test_rslora_scale_is_read_from_peft(tiny):
    peft_model = attach_lora(tiny, 4, 8, TARGETS, use_rslora=True)
    assert get_factors(peft_model)[Q0].scale == pytest.approx(8 / math.sqrt(4))


def test_attaching_again_replaces_the_adapter_on_one_base(tiny):
    weight = tiny.model.layers[0].self_attn.q_proj.weight
    peft_model = attach_lora(tiny, 4, 8, TARGETS, seed=5)
    first_A = get_factors(peft_model)[Q0].A
    set_factors(peft_model, random_factors(peft_model, seed=3))
    again = attach_lora(peft_model, 4, 8, TARGETS, seed=5)
    assert again is peft_model and not isinstance(peft_model.base_model.model, PeftModel)
    fresh = get_factors(again)[Q0]
    assert torch.equal(fresh.A, first_A) and not fresh.B.any()  # re-initialised, same seed
    assert base_weight(again, Q0).data_ptr() == weight.data_ptr()
    base_weights = [n for n, _ in again.named_parameters() if n.endswith("q_proj.base_layer.weight")]
    assert len(base_weights) == 2  # one per layer: no copies
    other = attach_lora(again, 2, 4, ["q_proj"], adapter_name="client-7", seed=6)
    assert other.active_adapter == "client-7"
    assert not torch.equal(get_factors(other, "client-7")[Q0].A[:2], first_A[:2])


def test_set_trainable_freezes_all_but_the_chosen_factor(tiny):
    peft_model = attach_lora(tiny, 4, 8, TARGETS)
    set_trainable(peft_model, {"A"}, "default")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(".lora_A.default." in n for n in trainable)
    set_trainable(peft_model, {"A", "B"}, "default")
    assert sum(p.requires_grad for p in peft_model.parameters()) == 8
    with pytest.raises(ValueError, match="C"):
        set_trainable(peft_model, {"C"}, "default")


def test_merge_update_reproduces_the_active_adapter(batch):
    peft_model = attach_lora(load_model("tiny-llama", dtype="float32")[0], 4, 8, TARGETS)
    set_factors(peft_model, random_factors(peft_model, seed=4))
    adapted = logits(peft_model, batch)
    update = GlobalUpdate(factors=get_factors(peft_model), merge=True)

    plain, _ = load_model("tiny-llama", dtype="float32")
    before = base_weight(plain, Q0).double().clone()
    carry = merge_update(plain, update)
    assert carry == {}  # float32 needs no compensation
    torch.testing.assert_close(logits(plain, batch), adapted, rtol=0, atol=1e-5)
    reference = before + update.factors[Q0].delta(torch.float64)
    torch.testing.assert_close(base_weight(plain, Q0).double(), reference, rtol=0, atol=1e-6)

    merge_update(peft_model, update)  # into the PEFT model's base, adapter switched off
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits(peft_model, batch), adapted, rtol=0, atol=1e-5)


def test_merge_update_without_merge_only_merges_the_residual(tiny):
    peft_model = attach_lora(tiny, 4, 8, TARGETS)
    factors = random_factors(peft_model, seed=7)
    residual = {Q0: random_factors(peft_model, seed=8)[Q0]}
    plain, _ = load_model("tiny-llama", dtype="float32")
    before = {name: base_weight(plain, name).clone() for name in factors}
    merge_update(plain, GlobalUpdate(factors=factors, merge=False, residual=residual))
    torch.testing.assert_close(base_weight(plain, Q0), before[Q0] + residual[Q0].delta())
    assert all(torch.equal(base_weight(plain, n), before[n]) for n in factors if n != Q0)


def test_carry_keeps_many_small_bf16_updates_that_naive_addition_drops():
    model, _ = load_model("tiny-llama", dtype="bfloat16")
    naive_model, _ = load_model("tiny-llama", dtype="bfloat16")
    start = base_weight(model, Q0).double().clone()
    generator = torch.Generator().manual_seed(0)
    # Each update is ~1e-5 per entry, far below half a bf16 ulp of the ~0.02 weights.
    step = LoraFactors(A=torch.randn(2, 64, generator=generator),
                       B=torch.randn(64, 2, generator=generator), scale=1e-5 / 2)
    expected = torch.zeros_like(start)
    carry: dict[str, torch.Tensor] = {}
    for _ in range(1000):
        merge_factors(model, {Q0: step}, carry)
        with torch.no_grad():
            base_weight(naive_model, Q0).add_(step.delta(device=start.device).to(torch.bfloat16))
        expected += step.delta(torch.float64, start.device)

    def relative_error(weight):
        return ((weight.double() - start - expected).norm() / expected.norm()).item()

    assert relative_error(base_weight(model, Q0)) < 0.02
    assert relative_error(base_weight(naive_model, Q0)) > 0.5


def test_low_rank_adapter_error_is_the_svd_tail():
    delta = torch.randn(48, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    factors, error = low_rank_adapter(delta, 8)
    singular = torch.linalg.svdvals(delta)
    assert error == pytest.approx((singular[8:].norm() / singular.norm()).item(), rel=1e-9)
    residual = (delta - factors.delta(torch.float64)).norm() / delta.norm()
    assert residual.item() == pytest.approx(error, rel=1e-5)
    assert low_rank_adapter(torch.zeros(4, 4), 2)[1] == 0.0
    with pytest.raises(ValueError, match="rank 65"):
        low_rank_adapter(delta, 65)


def test_saved_adapter_loads_back_in_peft(tiny, tmp_path):
    generator = torch.Generator().manual_seed(1)
    truncated, errors = {}, {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        truncated[name], errors[name] = low_rank_adapter(torch.randn(64, 64, generator=generator), 4)
    out = save_adapter(tiny, truncated, rank=4, alpha=16, target_modules=["q_proj"], out_dir=tmp_path)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not isinstance(tiny, PeftModel) and type(tiny.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert all(0 < e < 1 for e in errors.values())

    loaded = PeftModel.from_pretrained(load_model("tiny-llama")[0], str(out))
    read = get_factors(loaded)
    assert set(read) == set(truncated)
    for name, factors in truncated.items():
        assert read[name].scale == 4.0
        torch.testing.assert_close(read[name].delta().cpu(), factors.delta(), rtol=0, atol=1e-5)


def test_remove_lora_returns_the_bare_model(tiny):
    peft_model = attach_lora(tiny, 4, 8, TARGETS)
    bare = remove_lora(peft_model)
    assert bare is tiny and not any("lora" in n for n, _ in bare.named_parameters())
