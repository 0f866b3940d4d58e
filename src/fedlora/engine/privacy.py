"""Differential privacy of a run: its settings, the noise calibrated before training, and each
client's spent (ε, δ), accounted by Opacus' RDP accountant and checkpointed with the run.

Two guarantees, each stated per client:

- **sample-level** (``dp``): every client trains with DP-SGD (:mod:`fedlora.engine.dp_sgd`).
  One local step is a Poisson-subsampled Gaussian mechanism with sampling rate
  q_k = batch_size·grad_accum / N_k and noise multiplier σ; client k's ε composes every step
  it was asked to take, in every round it was sampled. Who is sampled is the server's choice
  and public; the batches and the noise are the client's secret (see ``seed``).
- **client-level** (``client_dp``): DP-FedAvg at the server (:mod:`fedlora.aggregation.dp`),
  for the methods whose broadcast is a weighted sum of one factor.
  Each sampled client's update is clipped to ``clip_norm`` and the sum is noised once per round;
  client k's ε composes one Gaussian mechanism (sampling rate 1) per round it was sampled.
  fedlora samples a fixed number of clients per round and logs whom, so the amplification that
  Poisson client sampling would give (rate = clients per round ÷ clients) is not claimed.

Both take ``noise_multiplier`` or ``target_epsilon`` (then σ is calibrated so that every
client's planned schedule – the rounds the seeded sampler will pick it, its local steps, its
rate q_k – ends within the target), ``delta``, and an optional ``seed`` that makes the noise
reproducible (tests, benchmarks); a seed known to the server voids the guarantee against it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedlora.aggregation import Aggregator, aggregator_class
from fedlora.aggregation.dp import require_client_dp, with_client_dp
from fedlora.engine.seeding import derive_seed
from fedlora.engine.task import ClientTask

#: the clipping bound's key in each setting
CLIP_KEYS = {"dp": "max_grad_norm", "client_dp": "clip_norm"}


@dataclass(frozen=True)
class PrivacySpec:
    """One guarantee as configured: exactly one of ``noise_multiplier`` and ``target_epsilon``."""

    clip: float
    delta: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    seed: int | None = None

    @classmethod
    def parse(cls, values: Mapping[str, Any], clip_key: str) -> PrivacySpec:
        """The spec of a ``dp``/``client_dp`` table; ValueError naming the bad key."""
        known = {"noise_multiplier", "target_epsilon", "delta", "seed", clip_key}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"has unknown keys {unknown}; expected {sorted(known)}")
        if ("noise_multiplier" in values) == ("target_epsilon" in values):
            raise ValueError("needs exactly one of 'noise_multiplier' and 'target_epsilon'")
        for key in (clip_key, "delta"):
            if key not in values:
                raise ValueError(f"needs {key!r}")
        numbers = {key: values[key] for key in known - {"seed"} if key in values}
        for key, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{key!r} must be a positive number, got {value!r}")
        if not values["delta"] < 1:
            raise ValueError(f"'delta' must be below 1, got {values['delta']!r}")
        seed = values.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"'seed' must be an integer, got {seed!r}")
        return cls(clip=float(values[clip_key]), delta=float(values["delta"]),
                   noise_multiplier=_optional_float(values.get("noise_multiplier")),
                   target_epsilon=_optional_float(values.get("target_epsilon")), seed=seed)

    def calibrated(self, schedules: Iterable[tuple[float, int]]) -> float:
        """σ: the configured one, or the smallest (to Opacus' 0.01 in ε) with which every
        (sampling rate, steps) schedule stays within ``target_epsilon``."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        from opacus.accountants.utils import get_noise_multiplier  # opacus (and scipy) load for DP runs only
        needed = [get_noise_multiplier(target_epsilon=self.target_epsilon, target_delta=self.delta,
                                       sample_rate=rate, steps=steps, accountant="rdp")
                  for rate, steps in set(schedules) if steps > 0]
        if not needed:
            raise ValueError("no client is ever sampled, so there is nothing to calibrate")
        return max(needed)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


class PrivacyLedger:
    """One RDP accountant per client; their histories of (σ, q, steps) are the whole state."""

    def __init__(self, client_ids: Iterable[str], delta: float):
        from opacus.accountants import RDPAccountant  # opacus (and scipy) load for DP runs only
        self.delta = delta
        self.accountants = {cid: RDPAccountant() for cid in client_ids}

    def spend(self, client_id: str, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        accountant = self.accountants[client_id]
        for _ in range(steps):
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def spent(self) -> dict[str, dict[str, float]]:
        """Every client's (ε, δ) so far; ε is 0 for a client never sampled."""
        with warnings.catch_warnings():
            # for a small ε the best RDP order is Opacus' largest: a valid, slightly loose bound;
            # its default orders are kept so that ε is exactly what Opacus reports
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return {cid: {"epsilon": float(accountant.get_epsilon(delta=self.delta)), "delta": self.delta}
                    for cid, accountant in self.accountants.items()}

    def state_dict(self) -> dict[str, list]:
        return {cid: [list(entry) for entry in accountant.history] for cid, accountant in self.accountants.items()}

    def load_state_dict(self, state: Mapping[str, list]) -> None:
        for cid, history in state.items():
            self.accountants[cid].history = [tuple(entry) for entry in history]


@dataclass
class Guarantee:
    """One configured guarantee of a run: its spec, its σ and its ledger."""

    spec: PrivacySpec
    noise_multiplier: float
    ledger: PrivacyLedger


class RunPrivacy:
    """The run's DP: σ for each guarantee, the clients' ledgers, and the hooks the round loop calls.

    ``sample_rates`` are the clients' q_k; ``sampled`` says whom round r samples (the seeded
    sampler, so the plan is exactly what the run will do) and ``local_steps`` how many steps
    a client takes per round.
    """

    def __init__(self, sample: PrivacySpec | None, client: PrivacySpec | None, sample_rates: dict[str, float],
                 rounds: int, sampled: Callable[[int], list[str]], local_steps: Callable[[str], int]):
        self.sample_rates = sample_rates
        joined = {cid: 0 for cid in sample_rates}
        for server_round in range(1, rounds + 1):
            for cid in sampled(server_round):
                joined[cid] += 1
        self.sample = self.client = None
        if sample is not None:
            sigma = sample.calibrated((sample_rates[cid], joined[cid] * local_steps(cid)) for cid in joined)
            self.sample = Guarantee(sample, sigma, PrivacyLedger(sample_rates, sample.delta))
        if client is not None:
            sigma = client.calibrated((1.0, count) for count in joined.values())
            self.client = Guarantee(client, sigma, PrivacyLedger(sample_rates, client.delta))

    def task_options(self, client_id: str, server_round: int) -> dict[str, Any]:
        """The DP-SGD fields of a :class:`ClientTask`; a seed only where the run sets one."""
        if self.sample is None:
            return {}
        spec = self.sample.spec
        seed = None if spec.seed is None else derive_seed(spec.seed, "dp-sgd", server_round, client_id)
        return {"dp_noise_multiplier": self.sample.noise_multiplier, "dp_max_grad_norm": spec.clip,
                "dp_noise_seed": seed}

    def protect(self, method: Aggregator, clients_per_round: int) -> Aggregator:
        """The method with client-level DP, when the run asks for it."""
        if self.client is None:
            return method
        return with_client_dp(method, clip_norm=self.client.spec.clip, noise_multiplier=self.client.noise_multiplier,
                              clients_per_round=clients_per_round, noise_seed=self.client.spec.seed)

    def account(self, tasks: Iterable[ClientTask]) -> None:
        """Charge a round's tasks: a client asked to train is charged whether or not its update
        arrives (it may have trained and sent it before failing)."""
        for task in tasks:
            if self.sample is not None:
                self.sample.ledger.spend(task.client_id, self.sample.noise_multiplier,
                                         self.sample_rates[task.client_id], task.local_steps)
            if self.client is not None:
                self.client.ledger.spend(task.client_id, self.client.noise_multiplier, 1.0, 1)

    def row(self) -> dict[str, Any]:
        """Each client's (ε, δ) so far, for a metrics row: ``privacy`` (sample-level) and
        ``client_privacy`` (client-level), whichever the run has."""
        return {key: guarantee.ledger.spent() for key, guarantee in self._guarantees().items()}

    def summary(self) -> dict[str, Any]:
        """:meth:`row` plus the σ each guarantee used, for summary.json."""
        return {**self.row(), "privacy_noise_multipliers": {
            key: guarantee.noise_multiplier for key, guarantee in self._guarantees().items()}}

    def state_dict(self) -> tuple[dict[str, Any], dict]:
        return {key: guarantee.ledger.state_dict() for key, guarantee in self._guarantees().items()}, {}

    def load_state_dict(self, state: tuple[Mapping[str, Any] | None, dict]) -> None:
        state = state[0]
        for key, guarantee in self._guarantees().items():
            if key not in (state or {}):
                raise ValueError(f"the checkpoint holds no {key!r} ledger: its rounds ran without this "
                                 "DP setting, so no (ε, δ) can be stated for them; start a new run")
            guarantee.ledger.load_state_dict(state[key])

    def _guarantees(self) -> dict[str, Guarantee]:
        return {key: guarantee for key, guarantee in (("privacy", self.sample), ("client_privacy", self.client))
                if guarantee is not None}


def check_privacy(config, fail: Callable[[str, str], None]) -> None:
    """The ``dp`` and ``client_dp`` tables, and the runs they cannot protect."""
    for key, clip_key in CLIP_KEYS.items():
        if getattr(config, key):
            try:
                PrivacySpec.parse(getattr(config, key), clip_key)
            except ValueError as error:
                fail(key, str(error))
    if (config.dp or config.client_dp) and config.data_on_nodes:
        fail("data_on_nodes", "hides the clients' sizes, which DP accounting needs (q = batch ÷ size)")
    if config.client_dp:
        try:
            require_client_dp(aggregator_class(config.method))
        except ValueError as error:
            fail("client_dp", str(error))
    if config.dp and not aggregator_class(config.method).sample_dp:
        fail("dp", f"cannot protect {config.method!r}: its clients' training runs steps of its own outside "
                   "Opacus' DP-SGD")


def sample_rate(batch_size: int, grad_accum: int, num_examples: int) -> float:
    """q = expected examples per DP-SGD step ÷ the client's examples (1 for a client that small)."""
    return min(1.0, batch_size * grad_accum / num_examples)


def run_privacy(config, client_sizes: Mapping[str, int | None], sampled: Callable[[int], list[str]],
                local_steps: Callable[[str], int]) -> RunPrivacy | None:
    """The run's :class:`RunPrivacy`, calibrated on its schedule (whom ``sampled`` picks each
    round, each client's ``local_steps``), or None when ``config`` asks for no DP."""
    if not config.dp and not config.client_dp:
        return None
    specs = {key: PrivacySpec.parse(getattr(config, key), clip) if getattr(config, key) else None
             for key, clip in CLIP_KEYS.items()}
    rates = {cid: sample_rate(config.batch_size, config.grad_accum, size) for cid, size in client_sizes.items()}
    return RunPrivacy(specs["dp"], specs["client_dp"], rates, config.rounds, sampled, local_steps)
