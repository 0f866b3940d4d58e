"""The server's global model: base weights with every merged update, plus the global adapter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fedlora.aggregation import GlobalUpdate, LoraFactors
from fedlora.engine.checkpoint import with_prefix
from fedlora.lora import load_merged_state, merge_update, merged_state
from fedlora.lora.merge import merged_for_now
from fedlora.lora.residual import is_quantized
from fedlora.models import model_device


class GlobalModel:
    """Holds the model the server evaluates, checkpoints and exports.

    Merged updates (FLoRA's stacked factors, FedEx-LoRA's residual) go into the base weights for
    good (into the full-precision residual beside a quantised linear); a persistent global
    adapter (FedIT and kin) is merged only temporarily, for evaluation or export, and the exact
    previous state is restored afterwards.
    """

    def __init__(self, model: nn.Module, adapted_modules: list[str]):
        self.model = model
        self.adapted_modules = adapted_modules
        self.carry: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        """Where the model's weights are, and so where its checkpointed state is loaded to."""
        return model_device(self.model)

    def apply(self, update: GlobalUpdate) -> None:
        self.carry = merge_update(self.model, update, self.carry)

    @contextmanager
    def with_adapter(self, adapter: dict[str, LoraFactors] | None) -> Iterator[nn.Module]:
        """The model with ``adapter`` merged in; the base weights are restored bit-exactly on exit."""
        with merged_for_now(self.model, adapter) as model:
            yield model

    def adapted_weights(self) -> dict[str, torch.Tensor]:
        """All that merges ever change besides the carry (:func:`fedlora.lora.merged_state`): the
        adapted base weights, or the residuals of quantised ones; enough to checkpoint the model."""
        return merged_state(self.model, self.adapted_modules)

    def load_adapted_weights(self, weights: dict[str, torch.Tensor]) -> None:
        load_merged_state(self.model, weights)

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """For a checkpoint: the adapted base weights (or residuals) and the merge carry."""
        return {}, {**{f"base/{name}": w for name, w in self.adapted_weights().items()},
                    **{f"carry/{name}": c for name, c in self.carry.items()}}

    def load_state_dict(self, state: tuple[dict, dict[str, torch.Tensor]]) -> None:
        _, tensors = state
        self.load_adapted_weights(with_prefix("base/", tensors))
        self.carry = with_prefix("carry/", tensors)

    def total_params(self) -> int:
        """The model's parameters as full fine-tuning would train them: a quantised linear's
        packed weight counts as its d×n entries."""
        return sum(p.numel() for p in self.model.parameters()) + sum(
            module.in_features * module.out_features - module.weight.numel()
            for module in self.model.modules() if isinstance(module, nn.Linear) and is_quantized(module))
