"""Client-level differential privacy at the server: DP-FedAvg (McMahan et al., 2018) on LoRA factors.

Only where what the server broadcasts is a weighted sum of one factor of the clients' updates,
the other factor shared or kept by each client (methods declaring ``client_dp``): FFA-LoRA (B,
on a frozen shared A), RoLoRA (the factor of the round) and FedSA-LoRA (A; each client's B
goes back to that client alone).
Then clipping each client's change of that factor and noising the sum once hides any one
client, and the result is still a rank-r adapter. Stacking methods (FLoRA, FlexLoRA) publish
every client's own factors in the broadcast, where noise on a sum hides nothing; they are
refused by configuration.

Per round, with Δ_k the change of client k's shared factor (over every module, as one vector)
from the adapter the round started from, S the clip norm, σ the noise multiplier and m the
clients sampled per round (a fixed denominator, as in DP-FedAvg, so that one client moves the
sum by at most S whoever else replied):

    new = start + (Σ_k Δ_k·min(1, S/‖Δ_k‖) + N(0, σ²S²·I)) / m

Every client weighs 1/m whatever its example count: weighting by counts would let one
client's share, and so the sensitivity, grow with its data.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fedlora.aggregation.factors import AggregationError, ClientUpdate, GlobalUpdate, LoraFactors
from fedlora.aggregation.method import Aggregator, MethodOptions
from fedlora.aggregation.registry import available_aggregators, aggregator_class


@dataclass(frozen=True)
class ClientLevelDPSettings:
    """Clip norm S, noise multiplier σ, the fixed denominator m, and the noise's seed (None:
    drawn from the operating system's entropy)."""

    clip_norm: float
    noise_multiplier: float
    clients_per_round: int
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        if not self.clip_norm > 0 or not self.noise_multiplier >= 0 or self.clients_per_round < 1:
            raise ValueError(f"clip_norm {self.clip_norm} must be > 0, noise_multiplier {self.noise_multiplier} ≥ 0 "
                             f"and clients_per_round {self.clients_per_round} ≥ 1")


class ClientLevelDP(Aggregator):
    """A method with each client's change clipped and the sum noised: mixed in before the
    method's own class by :func:`with_client_dp`, so every call but the two here is the
    method's own, inherited, and none can be missed. A round whose clients would each draw a
    fresh LoRA (FedSA-LoRA's first) starts them from one the server draws, so that each change
    can be measured from it."""

    def __init__(self, options: MethodOptions, *, dp: ClientLevelDPSettings):
        super().__init__(options)
        self.dp = dp

    def start_adapter(self, client_id: str, server_round: int) -> dict[str, LoraFactors] | None:
        start = super().start_adapter(client_id, server_round)
        return start if start is not None else self.drawn_start(client_id)

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        if weights is not None:
            raise AggregationError("client-level DP weighs every client 1/clients_per_round; "
                                   "explicit weights would change its sensitivity", rule="weights")
        if server_round is None:
            raise AggregationError("client-level DP needs the server_round (its noise is drawn per round)",
                                   rule="phase")
        plain = super().combine(updates, server_round=server_round)  # the method's own checks
        (shared,) = self.uploads(server_round)  # the factor whose weighted sum is broadcast
        # the shared factor's start is the same for every client of the round (before commit)
        start = {module: getattr(factors, shared)
                 for module, factors in self.start_adapter(updates[0].client_id, server_round).items()}
        total = {module: torch.zeros_like(tensor) for module, tensor in start.items()}
        clipped = 0
        for update in updates:
            change = {module: getattr(update.factors[module], shared) - start[module] for module in start}
            norm = math.sqrt(sum(float(delta.double().square().sum()) for delta in change.values()))
            factor = min(1.0, self.dp.clip_norm / norm) if norm > 0 else 1.0
            clipped += factor < 1.0
            for module in start:
                total[module] += factor * change[module]
        noise = gaussian_noise({module: tensor.shape for module, tensor in total.items()},
                               self.dp.noise_multiplier * self.dp.clip_norm, self._generator(server_round))
        noised = {module: start[module] + (total[module] + noise[module].to(total[module])) / self.dp.clients_per_round
                  for module in start}

        def with_noised(factors: dict[str, LoraFactors]) -> dict[str, LoraFactors]:
            return {module: replace(f, **{shared: noised[module]}) for module, f in factors.items()}

        return replace(plain, factors=with_noised(plain.factors),
                       client_factors={cid: with_noised(models) for cid, models in plain.client_factors.items()},
                       info={**plain.info, "dp_clipped": int(clipped),
                             "dp_noise_std": self.dp.noise_multiplier * self.dp.clip_norm / self.dp.clients_per_round})

    def _generator(self, server_round: int) -> torch.Generator:
        if self.dp.noise_seed is None:
            seed = secrets.randbits(63)
        else:
            digest = hashlib.sha256(f"{self.dp.noise_seed}/client-dp/{server_round}".encode()).digest()
            seed = int.from_bytes(digest[:8], "big") >> 1
        return torch.Generator().manual_seed(seed)


def with_client_dp(method: Aggregator, **settings) -> Aggregator:
    """``method`` (same options) with client-level DP: ValueError, saying why, for a method it cannot protect."""
    require_client_dp(type(method))
    private = type(f"ClientLevelDP{type(method).__name__}", (ClientLevelDP, type(method)), {})
    return private(method.options, dp=ClientLevelDPSettings(**settings))


def require_client_dp(method: type[Aggregator]) -> None:
    """ValueError, saying why, for a method client-level DP cannot protect."""
    if not method.client_dp:
        protected = [name for name in available_aggregators() if aggregator_class(name).client_dp]
        raise ValueError(f"needs a method whose broadcast is a weighted sum of one factor "
                         f"({', '.join(protected)}), not {method.name!r}: a stacking method "
                         "broadcasts every client's own factors, which noise added to a sum cannot hide, "
                         "and the others have no single summed factor to noise")


def gaussian_noise(shapes: dict[str, Sequence[int]], std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """N(0, std²) float32 noise of each shape, drawn on the CPU in key order (the same on any device)."""
    return {key: torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * std
            for key, shape in shapes.items()}
