"""Gradient checkpointing and bf16 autocast in client training, against the plain computation."""

from __future__ import annotations

import pytest
import torch

from fedlora.data import Record, collate, tokenize_records
from fedlora.engine.compute import ComputeOptions
from fedlora.engine.config import ConfigError, build_config
from fedlora.engine.client import LocalTrainer
from fedlora.aggregation import ClientPlan
from fedlora.engine.task import ClientTask
from fedlora.lora import attach_lora, remove_lora
from fedlora.models import load_model

TARGETS = ["q_proj", "v_proj"]


def examples(tokenizer, count: int = 4):
    records = [Record(f"Question {i}: which colour is the sky at {i} o'clock?", "" if i % 2 else f"Context {i}",
                      f"Answer {i}: {'blue grey red black'.split()[i % 4]}.") for i in range(count)]
    return tokenize_records(tokenizer, records, 48)[0]


@pytest.fixture
def tiny(device):
    model, tokenizer = load_model("tiny-llama", device=device, dtype="float32")
    return model, tokenizer, collate(examples(tokenizer), tokenizer.pad_token_id)


def lora_gradients(peft_model, batch: dict, options: ComputeOptions) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward pass under ``options``: the loss and every LoRA gradient."""
    device = next(peft_model.parameters()).device
    peft_model.zero_grad(set_to_none=True)
    peft_model.train()
    with options.applied(peft_model):
        loss = peft_model(**{key: value.to(device) for key, value in batch.items()}).loss
        loss.backward()
    peft_model.eval()
    return loss.item(), {name: p.grad.clone() for name, p in peft_model.named_parameters() if p.grad is not None}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_checkpointed_gradients_equal_the_plain_ones_and_the_layers_run_twice(tiny):
    model, _, batch = tiny
    peft_model = attach_lora(model, 4, 8, TARGETS, seed=3)
    # B starts at zero, which would leave A's gradients zero: give B values first
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1, generator=torch.Generator(parameter.device).manual_seed(0))
    calls = []  # of a module inside a decoder layer (the layer's own hooks stay outside the checkpoint)
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    plain_loss, plain = lora_gradients(peft_model, batch, ComputeOptions())
    plain_calls = len(calls)
    checkpointed_loss, checkpointed = lora_gradients(peft_model, batch, ComputeOptions(gradient_checkpointing=True))
    hook.remove()

    assert plain_calls == 1 and len(calls) - plain_calls == 2, "checkpointing recomputes the layer in the backward pass"
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert set(checkpointed) == set(plain) and len(plain) == 2 * 2 * len(TARGETS)  # A and B, 2 layers
    for name, gradient in plain.items():
        assert gradient.norm() > 0, name
        assert relative(checkpointed[name], gradient) <= 1e-5, name
    base = peft_model.get_base_model()
    assert not any(getattr(m, "gradient_checkpointing", False) for m in base.modules()), "left switched on"
    assert base.config.use_cache is True


def test_autocast_runs_the_forward_in_bfloat16_and_keeps_the_factors_float32(tiny):
    model, _, batch = tiny
    peft_model = attach_lora(model, 4, 8, TARGETS, seed=3)
    seen = []
    base_q = model.model.layers[0].self_attn.q_proj.base_layer
    hook = base_q.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    plain_loss, plain = lora_gradients(peft_model, batch, ComputeOptions())
    autocast_loss, autocast = lora_gradients(peft_model, batch, ComputeOptions(autocast="bfloat16"))
    hook.remove()

    assert seen == [torch.float32, torch.bfloat16]
    assert autocast_loss == pytest.approx(plain_loss, rel=2e-2)
    for name, gradient in plain.items():
        assert autocast[name].dtype == torch.float32
        if gradient.norm() > 0:  # A's gradients are zero while B is (fresh LoRA)
            assert relative(autocast[name], gradient) <= 5e-2, name
    assert any(gradient.norm() > 0 for gradient in plain.values())
    assert "forward" not in vars(peft_model), "the class's forward is restored"
    assert all(p.dtype == torch.float32 for p in peft_model.parameters())
    remove_lora(peft_model)


def test_trainer_with_checkpointing_trains_as_the_plain_trainer(device):
    model, tokenizer = load_model("tiny-llama", device=device)
    data = examples(tokenizer, 6)
    task = ClientTask(client_id="a", server_round=1, plan=ClientPlan(rank=4), alpha=8.0, init_seed=1,
                      data_seed=2, local_steps=3)
    factors = {}
    for options in (ComputeOptions(), ComputeOptions(gradient_checkpointing=True),
                    ComputeOptions(gradient_checkpointing=True, autocast="bfloat16")):
        trainer = LocalTrainer(model, tokenizer.pad_token_id, target_modules=TARGETS, batch_size=2, lr=1e-2,
                               compute=options)
        result = trainer.train(task, data)
        model = trainer.model
        factors[options] = result.update.factors
        assert torch.isfinite(torch.tensor(result.train_loss))
    plain, checkpointed, both = factors.values()
    for name, f in plain.items():
        assert f.B.norm() > 0
        assert relative(checkpointed[name].delta(), f.delta()) <= 1e-4, name
        assert relative(both[name].delta(), f.delta()) <= 0.15, name  # bf16 matmuls: the same training, rounded
    assert "forward" not in vars(model) and model.config.use_cache is True


def test_run_options_reach_the_trainer_and_are_checked():
    config = build_config({"gradient_checkpointing": True, "autocast": "bfloat16"})
    assert ComputeOptions.from_config(config) == ComputeOptions(gradient_checkpointing=True, autocast="bfloat16")
    model, tokenizer = load_model("tiny-llama", device="cpu")
    assert LocalTrainer.from_config(model, 0, config).compute == ComputeOptions(True, "bfloat16")
    assert build_config({}).autocast is None and build_config({}).gradient_checkpointing is False
    with pytest.raises(ConfigError, match="'autocast' must be one of 'bfloat16'"):
        build_config({"autocast": "float16"}, source="run.toml")
