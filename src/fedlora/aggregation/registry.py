"""Name → class of every aggregation method. Adding a method: one module, one line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.aggregation.facts import MethodFacts, method_facts
from fedlora.imports import resolve

if TYPE_CHECKING:
    from fedlora.aggregation.method import Aggregator

AGGREGATORS: dict[str, str] = {
    "flora": "fedlora.aggregation.flora:FLoRA",
    "flora-warm": "fedlora.aggregation.flora_warm:FLoRAWarm",
    "flora-adalora": "fedlora.aggregation.flora_adalora:FLoRAAdaLoRA",
    "fedit": "fedlora.aggregation.fedit:FedIT",
    "zeropad": "fedlora.aggregation.zeropad:ZeroPad",
    "ffa": "fedlora.aggregation.ffa:FFALoRA",
    "rolora": "fedlora.aggregation.rolora:RoLoRA",
    "flexlora": "fedlora.aggregation.flexlora:FlexLoRA",
    "fedex": "fedlora.aggregation.fedex:FedExLoRA",
    "fedsa": "fedlora.aggregation.fedsa:FedSALoRA",
    "lorafair": "fedlora.aggregation.lorafair:LoRAFAIR",
    "florist": "fedlora.aggregation.florist:FLoRIST",
    "hetlora": "fedlora.aggregation.hetlora:HetLoRA",
    "raflora": "fedlora.aggregation.raflora:RaFLoRA",
    "fedsvd": "fedlora.aggregation.fedsvd:FedSVD",
    "florana": "fedlora.aggregation.florana:FLoRANA",
    "fedmomentum": "fedlora.aggregation.fedmomentum:FedMomentum",
    "ravan": "fedlora.aggregation.ravan:RAVAN",
    "fedplora": "fedlora.aggregation.fedplora:FedPLoRA",
    "centralized": "fedlora.aggregation.centralized:Centralized",
    "local": "fedlora.aggregation.local:LocalOnly",
}

#: the method a run uses unless it names one
DEFAULT_METHOD = "flora"


def available_aggregators() -> list[str]:
    return list(AGGREGATORS)


def describe_methods() -> dict[str, MethodFacts]:
    """What every registered method declares (summary, paper, exactness, capabilities, what
    travels, options), read from the source without importing it: no torch import."""
    return {name: method_facts(name, target) for name, target in AGGREGATORS.items()}


def aggregator_class(name: str) -> type[Aggregator]:
    try:
        target = AGGREGATORS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}; available: "
                         f"{', '.join(AGGREGATORS)}") from None
    return resolve(target)


def get_aggregator(name: str, **options) -> Aggregator:
    """Build the aggregator registered as ``name`` with its method-specific ``options``
    (ValueError naming the method for options its ``Options`` dataclass refuses)."""
    cls = aggregator_class(name)
    try:
        return cls(cls.Options(**options))
    except TypeError as error:
        raise ValueError(f"bad options for aggregation method {name!r}: {error}") from None
