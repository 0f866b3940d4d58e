"""Exact federated LoRA aggregation as pure tensor math (no models, files or network)."""

from fedlora.aggregation.base import (
    Accumulator,
    AggregationError,
    Aggregator,
    ClientUpdate,
    GlobalUpdate,
    LoraFactors,
    check_factors,
    check_updates,
    example_weights,
)
from fedlora.aggregation.registry import aggregator_class, available_aggregators, get_aggregator

__all__ = [
    "Accumulator", "AggregationError", "Aggregator", "ClientUpdate", "GlobalUpdate", "LoraFactors",
    "aggregator_class", "available_aggregators", "check_factors", "check_updates",
    "example_weights", "get_aggregator",
]
