"""Padding-free batches: packed rows give the padded batch's loss and LoRA gradients, logits
only where labels are, and the fallback for a model that cannot pack."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from fedlora.attention import VARLEN_SDPA, enable_packing, packs_exactly
from fedlora.data import IGNORE_INDEX, MMLUQuestion, collate, load_records, tokenize_records
from fedlora.data.batches import packed_batch, padded_batch
from fedlora.engine.client import LocalTrainer
from fedlora.engine.config import RunConfig
from fedlora.aggregation import ClientPlan
from fedlora.engine.task import ClientTask
from fedlora.eval.loss import evaluate_loss_tokenized
from fedlora.eval.mmlu import answer_log_likelihoods
from fedlora.forward import summed_nll
from fedlora.lora import attach_lora, remove_lora
from fedlora.models import load_model

DOLLY_CLIENT = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly-10clients" / "local_training_0.json"

@pytest.fixture
def tiny():
    return load_model("tiny-llama", seed=0)


@pytest.fixture
def examples(tiny, client_dir):
    """Four training examples of different lengths (the padded batch really pads)."""
    examples, _ = tokenize_records(tiny[1], load_records(client_dir / "local_training_1.json")[:4], 256)
    assert len({len(e.input_ids) for e in examples}) > 1
    return examples


class IgnoresPacking(LlamaForCausalLM):
    """A model whose forward drops what marks packed sequences (position ids, varlen
    boundaries), as models that predate packing do: packed sequences attend across each other."""

    def forward(self, *args, position_ids=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                max_length_k=None, **kwargs):
        return super().forward(*args, **kwargs)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def lora_gradients(peft_model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.zero_grad(set_to_none=True)
    return grads


def check_packed_step_matches_padded(model, tokenizer, examples, rank: int = 4) -> None:
    """Loss and every LoRA gradient of a packed step against transformers' own loss on the
    right-padded batch (B random, so that A's gradients are not zero)."""
    assert enable_packing(model)
    peft_model = attach_lora(model, rank, 2 * rank, ["q_proj", "v_proj"], seed=0)
    try:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        peft_model.train()
        padded_loss = peft_model(**collate(examples, tokenizer.pad_token_id)).loss
        padded_loss.backward()
        padded = lora_gradients(peft_model)
        nll, tokens = summed_nll(peft_model, packed_batch(examples))
        packed_loss = nll / tokens
        packed_loss.backward()
        packed = lora_gradients(peft_model)
    finally:
        remove_lora(peft_model)
    assert tokens == sum(label != IGNORE_INDEX for e in examples for label in e.labels[1:])
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    assert packed.keys() == padded.keys() and len(packed) == 4 * model.config.num_hidden_layers
    for name, gradient in padded.items():
        assert gradient.norm() > 0, name
        assert relative_error(packed[name], gradient) <= 1e-5, name


def test_packed_batch_restarts_positions_and_no_target_crosses_a_border(tiny, examples):
    _, tokenizer = tiny
    examples = examples[:3]
    lengths = [len(e.input_ids) for e in examples]
    batch = packed_batch(examples)
    assert batch.inputs["input_ids"].tolist() == [sum((e.input_ids for e in examples), [])]
    assert batch.inputs["position_ids"].tolist() == [sum((list(range(n)) for n in lengths), [])]
    assert batch.inputs["cu_seq_lens_q"].tolist() == [0, lengths[0], sum(lengths[:2]), sum(lengths)]
    assert batch.inputs["max_length_q"] == max(lengths)
    expected = sum((e.labels[1:] + [IGNORE_INDEX] for e in examples), [])
    assert batch.targets.tolist() == [expected]
    padded = padded_batch(examples, tokenizer.pad_token_id)
    assert padded.targets[padded.labelled].tolist() == batch.targets[batch.labelled].tolist()


def test_packed_step_has_the_padded_loss_and_lora_gradients(tiny, examples):
    model, tokenizer = tiny
    check_packed_step_matches_padded(model, tokenizer, examples)


def test_varlen_attention_leaves_padded_batches_bit_identical(tiny, examples):
    model, tokenizer = tiny
    batch = padded_batch(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        before = model(**batch.inputs).logits
        assert enable_packing(model) and model.config._attn_implementation == VARLEN_SDPA
        assert torch.equal(model(**batch.inputs).logits, before)


@pytest.mark.parametrize("enabled", [False, True], ids=["sdpa-block-mask", "varlen-sdpa"])
def test_held_out_loss_packed_equals_padded(tiny, examples, enabled):
    model, tokenizer = tiny
    if enabled:
        assert enable_packing(model)
    padded = evaluate_loss_tokenized(model, examples, tokenizer.pad_token_id, batch_size=3)
    packed = evaluate_loss_tokenized(model, examples, tokenizer.pad_token_id, batch_size=3, packed=True)
    assert packed["eval_tokens"] == padded["eval_tokens"]
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-6)


def test_mmlu_packed_scores_equal_padded(tiny):
    model, tokenizer = tiny
    assert enable_packing(model)
    questions = [MMLUQuestion("What is 1 + 1?", ("1", "2", "3", "4"), "B", "arithmetic"),
                 MMLUQuestion("Which planet is known as the red planet of the solar system?",
                              ("Venus", "Jupiter", "Mars", "Saturn"), "C", "astronomy"),
                 MMLUQuestion("A long question " + "about many things, " * 6 + "which is it?",
                              ("this", "that", "neither", "both"), "B", "trivia")]
    alone = answer_log_likelihoods(model, tokenizer, questions, batch_size=1)
    packed = answer_log_likelihoods(model, tokenizer, questions, batch_size=3, packed=True)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    assert torch.equal(packed.argmax(dim=-1), alone.argmax(dim=-1))


def test_a_model_that_cannot_pack_trains_on_padded_batches_with_a_notice(tiny, examples):
    reference, tokenizer = tiny
    model = IgnoresPacking(reference.config).eval()
    assert not packs_exactly(model)
    notices = []
    trainer = LocalTrainer.from_config(model, tokenizer.pad_token_id, RunConfig(target_modules=["q_proj"]),
                                       log=notices.append)
    assert not trainer.packing and model.config._attn_implementation == "sdpa"
    assert len(notices) == 1 and "IgnoresPacking" in notices[0] and "padded" in notices[0]
    task = ClientTask(client_id="0", server_round=1, plan=ClientPlan(rank=2), alpha=4, init_seed=0,
                      data_seed=0, local_steps=2)
    result = trainer.train(task, examples)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.train_loss))


def test_packing_off_trains_on_padded_batches_without_probing(tiny):
    model, tokenizer = tiny
    notices = []
    trainer = LocalTrainer.from_config(model, tokenizer.pad_token_id, RunConfig(packing=False), log=notices.append)
    assert not trainer.packing and not notices and model.config._attn_implementation == "sdpa"


@pytest.mark.slow
@pytest.mark.skipif(not DOLLY_CLIENT.is_file(), reason=f"{DOLLY_CLIENT} is absent")
def test_smollm2_packed_step_has_the_padded_loss_and_lora_gradients(smollm2_cache):
    model, tokenizer = load_model("smollm2-135m", gguf_cache=smollm2_cache)
    records = load_records(DOLLY_CLIENT)[:4]
    examples, _ = tokenize_records(tokenizer, records, 128)
    assert len({len(e.input_ids) for e in examples}) > 1  # the padded batch really pads
    check_packed_step_matches_padded(model, tokenizer, examples, rank=8)
    padded = evaluate_loss_tokenized(model, examples, tokenizer.pad_token_id)
    packed = evaluate_loss_tokenized(model, examples, tokenizer.pad_token_id, packed=True)
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-6)
