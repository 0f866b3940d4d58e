"""RoLoRA: alternate which factor clients train, so each round's average is exact."""

from __future__ import annotations

from torch import Tensor

from fedlora.aggregation.base import (AggregationError, Aggregator, ClientUpdate, GlobalUpdate,
                                      example_weights)
from fedlora.aggregation.factored import normalized
from fedlora.aggregation.ffa import average_trained

PHASES = ("A", "B")


class RoLoRA(Aggregator):
    """Alternating optimisation (Chen et al., 2024): odd rounds train B, even rounds train A.

    The frozen factor is identical on every client, so averaging the trained one gives
    exactly Σ p_k ΔW_k. ``phase`` fixes the trained factor (for callers without round
    numbers); otherwise it follows ``server_round``.
    """

    name = "rolora"
    heterogeneous_ranks = False

    def __init__(self, phase: str | None = None):
        if phase is not None and phase not in PHASES:
            raise ValueError(f"phase must be 'A', 'B' or None, got {phase!r}")
        self.phase = phase

    def trainable(self, server_round: int) -> frozenset[str]:
        return frozenset({self._phase(server_round)})

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        trained = self._phase(server_round)
        weights = normalized(example_weights(updates, weights))
        factors = {module: average_trained(updates, weights, module, trained, self.name)
                   for module in updates[0].factors}
        return GlobalUpdate(factors=factors, merge=False, info={"phase": trained})

    def _phase(self, server_round: int | None) -> str:
        if self.phase is not None:
            return self.phase
        if server_round is None:
            raise AggregationError("rolora needs a server_round (1-based) or a fixed phase to know "
                                   "which factor was trained", rule="phase")
        return "B" if server_round % 2 == 1 else "A"
