"""Exact federated LoRA aggregation as pure tensor math (no models, files or network).

Names are imported on first use, so listing the registered methods (``fedlora methods``,
``fedlora --help``) does not import torch.
"""

from fedlora.imports import resolve

_EXPORTS = {
    **dict.fromkeys(("AggregationError", "ClientUpdate", "GlobalUpdate", "LoraFactors", "MethodState", "RunContext",
                     "check_factors", "check_updates", "example_weights", "factors_to_tensors",
                     "tensors_to_factors"), "fedlora.aggregation.factors"),
    **dict.fromkeys(("Accumulator", "Aggregator", "ClientPlan", "Drawn", "MethodOptions", "Regularizer", "RunShape"),
                    "fedlora.aggregation.method"),
    **dict.fromkeys(("aggregator_class", "available_aggregators", "describe_methods", "get_aggregator"),
                    "fedlora.aggregation.registry"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return resolve(f"{_EXPORTS[name]}:{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
