"""RoLoRA: alternate which factor clients train, so each round's average is exact."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fedlora.aggregation.factored import normalized
from fedlora.aggregation.factors import AggregationError, ClientUpdate, GlobalUpdate, example_weights
from fedlora.aggregation.ffa import average_trained
from fedlora.aggregation.method import Aggregator, MethodOptions, option

PHASES = ("A", "B")


@dataclass(frozen=True)
class RoLoRAOptions(MethodOptions):
    phase: str | None = option(None, "'A' or 'B': always train that factor; None: B in odd rounds, A in even ones")

    def __post_init__(self) -> None:
        if self.phase is not None and self.phase not in PHASES:
            raise ValueError(f"phase must be 'A', 'B' or None, got {self.phase!r}")


class RoLoRA(Aggregator):
    """Alternating optimisation (Chen et al., 2024): odd rounds train B, even rounds train A.

    The frozen factor is identical on every client, so averaging the trained one gives
    exactly Σ p_k ΔW_k. ``phase`` fixes the trained factor (for callers without round
    numbers); otherwise it follows ``server_round``.

    Weighting: not checked against public code; the run's ``weighting`` (default ``examples``).
    """

    name = "rolora"
    paper = "Chen et al., arXiv 2409.02346"
    exact = True
    sends = "the round's factor (B odd, A even rounds)"
    receives = "its average"
    heterogeneous_ranks = False
    client_dp = True
    Options = RoLoRAOptions

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
        if self.options.phase is not None:
            return self.options.phase
        if server_round is None:
            raise AggregationError("rolora needs a server_round (1-based) or a fixed phase to know "
                                   "which factor was trained", rule="phase")
        return "B" if server_round % 2 == 1 else "A"
