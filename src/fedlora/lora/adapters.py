"""Moving LoRA factors between a PEFT model and :class:`LoraFactors`.

Module keys are the qualified names of the adapted Linear inside the transformers model
(``model.layers.0.self_attn.q_proj``), never PEFT's ``base_model.model.`` prefix. One base
model serves many clients in sequence: :func:`attach_lora` wraps it once and afterwards only
replaces the named adapter, so the base weights are never copied.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from fedlora.aggregation.factors import CORE, FACTOR_NAMES, LoraFactors
from fedlora.lora.core import core_of, set_core


def lora_config(rank: int, alpha: float, target_modules: Iterable[str], *,
                use_rslora: bool = False) -> LoraConfig:
    """Plain LoRA on ``target_modules``: no dropout or bias, so the update is exactly scale*B@A."""
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                      bias="none", task_type=TaskType.CAUSAL_LM, use_rslora=use_rslora)


def attach_lora(model: nn.Module, rank: int, alpha: float, target_modules: Iterable[str], *,
                adapter_name: str = "default", use_rslora: bool = False, seed: int = 0) -> PeftModel:
    """Give ``model`` a freshly initialised adapter ``adapter_name`` and make it the active one.

    A plain model is wrapped once (in place, as PEFT does); on a PeftModel an adapter of the
    same name is replaced, so repeated calls neither nest wrappers nor copy the base weights.
    The same ``seed`` gives the same A (B starts at zero, as in LoRA).
    """
    config = lora_config(rank, alpha, target_modules, use_rslora=use_rslora)
    # PEFT draws A from the global RNG; fork it so seeding does not disturb the caller.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if not isinstance(model, PeftModel):
            return get_peft_model(model, config, adapter_name=adapter_name)
        if adapter_name in model.peft_config:
            model.delete_adapter(adapter_name)
        model.add_adapter(adapter_name, config)
    model.set_adapter(adapter_name)
    return model


def get_factors(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, LoraFactors]:
    """Detached float32 copies of the adapter's factors, with the scale PEFT applies (rsLoRA too),
    and its core s_h·H_h where it has one (lora/core.py)."""
    return {name: LoraFactors(A=f.A.detach().float().clone(), B=f.B.detach().float().clone(), scale=f.scale,
                              H=f.H.detach().float().clone() if f.H is not None else None)
            for name, f in live_factors(peft_model, adapter_name).items()}


def live_factors(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, LoraFactors]:
    """The adapter's factor parameters themselves (not copies): a loss term on them is
    differentiable and follows every optimizer step."""
    factors = {}
    for name, layer in _lora_layers(peft_model, adapter_name):
        core = core_of(layer, adapter_name)
        factors[name] = LoraFactors(A=layer.lora_A[adapter_name].weight, B=layer.lora_B[adapter_name].weight,
                                    scale=float(layer.scaling[adapter_name]),
                                    H=core.scaled_core() if core is not None else None)
    return factors


def set_factors(peft_model: PeftModel, factors: dict[str, LoraFactors],
                adapter_name: str = "default", *, leading: bool = False) -> None:
    """Copy ``factors`` into the adapter, which must adapt exactly these modules at these shapes.

    Where a factor's scale differs from the adapter's scaling, B is rescaled so the update
    ``scale * B @ A`` is preserved. With ``leading``, factors of a lower rank than the adapter's
    fill its leading components and the others keep their values: on a fresh adapter (B zero)
    the update is still exactly the factors'. Factors carrying a core H give the adapter that
    core (lora/core.py, head scales 1); the scale is then kept by rescaling H, not the frozen B.
    """
    layers = dict(_lora_layers(peft_model, adapter_name))
    if set(factors) != set(layers):
        missing, extra = sorted(set(layers) - set(factors)), sorted(set(factors) - set(layers))
        raise ValueError(f"factors do not match the modules of adapter {adapter_name!r}: "
                         f"missing {missing}, not adapted {extra}")
    with torch.no_grad():
        for name, layer in layers.items():
            update = factors[name]
            lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            rank = update.rank
            if leading and rank < lora_A.shape[0]:
                lora_A, lora_B = lora_A[:rank], lora_B[:, :rank]
            if update.A.shape != lora_A.shape or update.B.shape != lora_B.shape:
                raise ValueError(f"module {name!r}: factors A {tuple(update.A.shape)}, B "
                                 f"{tuple(update.B.shape)} do not fit adapter {adapter_name!r} "
                                 f"(A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)})")
            rescale = update.scale / float(layer.scaling[adapter_name])
            lora_A.copy_(update.A)
            if update.H is not None:
                lora_B.copy_(update.B)
                set_core(layer, adapter_name, update.H.float() * rescale)
            else:
                lora_B.copy_(update.B.float() * rescale)


def set_trainable(peft_model: PeftModel, trainable: Iterable[str], adapter_name: str = "default") -> None:
    """Let only the named factors ("A", "B", the core "H": its H and head scales) of
    ``adapter_name`` train; freeze everything else.

    Freezing one factor is how FFA-LoRA and RoLoRA keep aggregation exact; training only the
    core between frozen factors is RAVAN's.
    """
    trainable = set(trainable)
    unknown = trainable - {*FACTOR_NAMES, CORE}
    if unknown:
        raise ValueError(f"unknown factor names {sorted(unknown)}; expected a subset of {(*FACTOR_NAMES, CORE)}")
    for parameter in peft_model.parameters():
        parameter.requires_grad_(False)
    for name, layer in _lora_layers(peft_model, adapter_name):
        for factor in trainable - {CORE}:
            getattr(layer, f"lora_{factor}")[adapter_name].weight.requires_grad_(True)
        if CORE in trainable:
            core = core_of(layer, adapter_name)
            if core is None:
                raise ValueError(f"module {name!r} has no core to train; set factors carrying one first")
            core.core.requires_grad_(True)
            core.head_scale.requires_grad_(True)


def remove_lora(peft_model: PeftModel) -> nn.Module:
    """The bare transformers model with every adapter removed (not merged)."""
    return peft_model.unload()


def _lora_layers(peft_model: PeftModel, adapter_name: str) -> Iterator[tuple[str, LoraLayer]]:
    """(transformers module name, LoRA layer) for each module ``adapter_name`` adapts."""
    if not isinstance(peft_model, PeftModel) or adapter_name not in peft_model.peft_config:
        raise ValueError(f"model has no LoRA adapter named {adapter_name!r}")
    # get_base_model() is the transformers model with LoRA layers injected, so its module
    # names carry no PEFT prefix.
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module
