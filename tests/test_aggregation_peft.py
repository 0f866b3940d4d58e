"""FLoRA's stacking equals PEFT's ``add_weighted_adapter(combination_type="cat")``.

PEFT's cat builds A = [w_1 s_1 A_1; …; w_K s_K A_K], B = [B_1 | … | B_K] and gives the new
adapter lora_alpha = r = ΣR, i.e. scaling 1 (as long as the first adapter does not use rsLoRA,
whose config the new adapter copies). Its delta is therefore Σ w_k s_k B_k A_k — FLoRA's
update with p_k = w_k. FLoRA folds w_k s_k into B instead of A.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from fedlora.aggregation import ClientUpdate, LoraFactors, get_aggregator

PEFT_PREFIX = "base_model.model."
ADAPTERS = {"c0": (4, 8.0), "c1": (16, 4.0)}        # name: (rank, alpha) → scales 2 and 1/4


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(10, 12, bias=False)
        self.v_proj = nn.Linear(10, 8, bias=False)

    def forward(self, x):
        return self.v_proj(x) + self.q_proj(x)[:, :8]


def peft_model_with_adapters():
    torch.manual_seed(0)
    model = None
    for name, (rank, alpha) in ADAPTERS.items():
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
        if model is None:
            model = get_peft_model(Tiny(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    for layer in lora_layers(model).values():
        for name in ADAPTERS:          # PEFT initialises B to zero; make both factors nonzero
            nn.init.normal_(layer.lora_A[name].weight)
            nn.init.normal_(layer.lora_B[name].weight)
    return model


def lora_layers(model) -> dict[str, LoraLayer]:
    return {name.removeprefix(PEFT_PREFIX): module for name, module in model.named_modules()
            if isinstance(module, LoraLayer)}


# Example counts (1, 1) give p = (1/2, 1/2): with the powers-of-two scales every product w·s·x
# is exact in float32 whichever factor it is folded into, so the deltas must agree bitwise.
# (3, 7) gives non-dyadic weights: equal up to float32 rounding.
@pytest.mark.parametrize("counts, tolerance", [((1, 1), 0.0), ((3, 7), 1e-6)])
def test_flora_equals_peft_cat(counts, tolerance):
    model = peft_model_with_adapters()
    layers = lora_layers(model)
    updates = [ClientUpdate({module: LoraFactors(A=layer.lora_A[name].weight.detach().clone(),
                                                 B=layer.lora_B[name].weight.detach().clone(),
                                                 scale=layer.scaling[name])
                             for module, layer in layers.items()}, count, name)
               for name, count in zip(ADAPTERS, counts)]
    result = get_aggregator("flora").aggregate(updates)
    weights = [count / sum(counts) for count in counts]
    model.add_weighted_adapter(list(ADAPTERS), weights=weights, adapter_name="cat", combination_type="cat")
    for module, layer in layers.items():
        assert layer.scaling["cat"] == 1.0
        ours, theirs = result.delta(module), layer.get_delta_weight("cat").detach()
        assert ((ours - theirs).norm() / theirs.norm()).item() <= tolerance
