"""How a client's training step computes on a large model: gradient checkpointing and autocast.

Both are run options that trade something for GPU memory or speed and leave what is trained
unchanged. Gradient checkpointing (transformers' activation checkpointing, non-reentrant) keeps
only each decoder layer's input in the forward pass and recomputes the rest in the backward
pass: the gradients are the plain ones up to float rounding, for about a third more compute.
bfloat16 autocast runs the matmuls of the forward pass in bfloat16 while the base weights keep
their dtype and the LoRA factors float32 (mixed precision for a model loaded in float32).
float16 is not offered: without loss scaling its small gradients underflow.

Both are switched on for one client's training and off again, so the server evaluates and
merges into the plain model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn

from fedlora.models import model_device

#: the ``autocast`` run option's values
AUTOCAST_DTYPES = ("bfloat16",)


@dataclass(frozen=True)
class ComputeOptions:
    """The run options ``gradient_checkpointing`` and ``autocast`` (None or ``"bfloat16"``)."""

    gradient_checkpointing: bool = False
    autocast: str | None = None

    @classmethod
    def from_config(cls, config) -> ComputeOptions:
        return cls(gradient_checkpointing=config.gradient_checkpointing, autocast=config.autocast)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """``model`` (a PEFT or plain transformers model) trains with these options inside the block."""
        with ExitStack() as stack:
            if self.gradient_checkpointing:
                stack.enter_context(checkpointing(model))
            if self.autocast is not None:
                stack.enter_context(autocast_forward(model, getattr(torch, self.autocast)))
            yield


@contextmanager
def checkpointing(model: nn.Module) -> Iterator[None]:
    """Activation checkpointing of every decoder layer for the block, off again after it."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; the old
    # names warn there and are all that older versions have.
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    # Non-reentrant checkpointing needs no input that requires grad, which a frozen embedding
    # under LoRA does not give. Training needs no KV cache, which checkpointing would refuse
    # with a warning at every step.
    use_cache = base.config.use_cache
    enable({"use_reentrant": False})
    base.config.use_cache = False
    try:
        yield
    finally:
        base.config.use_cache = use_cache
        disable()


@contextmanager
def autocast_forward(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """``model``'s forward pass (loss included) runs under ``torch.autocast`` for the block.

    Only the forward is wrapped, as torch recommends: the backward pass then runs each op in
    the dtype its forward used. This is how accelerate applies mixed precision to a model.
    """
    own_forward = vars(model).get("forward")  # an instance attribute set by someone else, if any
    model.forward = torch.autocast(model_device(model).type, dtype=dtype)(model.forward)
    try:
        yield
    finally:
        if own_forward is None:
            del model.forward  # the class's forward again
        else:
            model.forward = own_forward
