"""The server's global model: base weights with every merged update, plus the global adapter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fedlora.aggregation import GlobalUpdate, LoraFactors
from fedlora.engine.checkpoint import with_prefix
from fedlora.lora import merge_update
from fedlora.lora.merge import base_weight, merged_for_now
from fedlora.models import model_device


class GlobalModel:
    """Holds the model the server evaluates, checkpoints and exports.

    Merged updates (FLoRA's stacked factors, FedEx-LoRA's residual) go into the base weights for
    good; a persistent global adapter (FedIT and kin) is merged only temporarily, for
    evaluation or export, and the exact previous weights are restored afterwards.
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
        """The only base weights merges ever change: enough to checkpoint the global model."""
        return {name: base_weight(self.model, name).detach().clone() for name in self.adapted_modules}

    def load_adapted_weights(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, weight in weights.items():
                base_weight(self.model, name).copy_(weight)

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """For a checkpoint: the adapted base weights and the merge carry."""
        return {}, {**{f"base/{name}": w for name, w in self.adapted_weights().items()},
                    **{f"carry/{name}": c for name, c in self.carry.items()}}

    def load_state_dict(self, state: tuple[dict, dict[str, torch.Tensor]]) -> None:
        _, tensors = state
        self.load_adapted_weights(with_prefix("base/", tensors))
        self.carry = with_prefix("carry/", tensors)

    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
