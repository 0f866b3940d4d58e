"""Moving LoRA factors between PEFT models and LoraFactors; merging updates; exporting adapters."""

from fedlora.lora.adapters import (
    attach_lora,
    get_factors,
    live_factors,
    lora_config,
    remove_lora,
    set_factors,
    set_trainable,
)
from fedlora.lora.export import low_rank_adapter, save_adapter
from fedlora.lora.merge import (base_layer, base_weight, load_merged_state, merge_factors, merge_update, merged_state,
                                module_shape)

__all__ = [
    "attach_lora", "base_layer", "base_weight", "get_factors", "live_factors", "load_merged_state", "lora_config",
    "low_rank_adapter", "merge_factors", "merge_update", "merged_state", "module_shape", "remove_lora", "save_adapter",
    "set_factors", "set_trainable",
]
