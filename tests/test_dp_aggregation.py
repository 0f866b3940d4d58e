"""Client-level DP (DP-FedAvg) around FFA-LoRA, RoLoRA and FedSA-LoRA: clipping and noise, as tensor math."""

from __future__ import annotations

import pytest
import torch

from fedlora.aggregation import AggregationError, ClientUpdate, GlobalUpdate, LoraFactors, RunContext, get_aggregator
from fedlora.aggregation import Aggregator
from fedlora.aggregation.dp import with_client_dp

MODULES = {"layer.0.q_proj": (48, 40), "layer.0.v_proj": (24, 40)}
RANK, SCALE = 4, 2.0
CLIENTS = ("a", "b", "c")


def dp(method: str, clip_norm: float, noise_multiplier: float, clients_per_round: int, seed: int | None = 7,
       shapes: dict = MODULES) -> Aggregator:
    aggregator = with_client_dp(get_aggregator(method), clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                                clients_per_round=clients_per_round, noise_seed=seed)
    aggregator.setup(RunContext(ranks=dict.fromkeys(CLIENTS, RANK), scales=dict.fromkeys(CLIENTS, SCALE),
                                shapes=shapes))
    return aggregator


def trained(client: str, start: dict[str, LoraFactors], factor: str, size: float, seed: int) -> ClientUpdate:
    """``start`` with ``factor`` moved by a random change of about ``size`` per entry."""
    generator = torch.Generator().manual_seed(seed)
    factors = {m: LoraFactors(**{"A": f.A, "B": f.B, factor: getattr(f, factor) + size * torch.randn(
        getattr(f, factor).shape, generator=generator)}, scale=f.scale) for m, f in start.items()}
    return ClientUpdate(factors, num_examples=10 + seed, client_id=client)


def change_norm(update: ClientUpdate, start: dict[str, LoraFactors], factor: str) -> float:
    return float(sum((getattr(update.factors[m], factor).double() - getattr(start[m], factor).double()).square().sum()
                     for m in start).sqrt())


def test_each_client_change_is_clipped_jointly_over_modules_and_divided_by_clients_per_round():
    aggregator = dp("ffa", clip_norm=2.0, noise_multiplier=0.0, clients_per_round=4)
    start = aggregator.start_adapter("a", 1)  # drawn by the server: A shared, B = 0
    assert all(torch.equal(f.B, torch.zeros_like(f.B)) for f in start.values())
    updates = [trained("a", start, "B", 0.01, 1), trained("b", start, "B", 1.0, 2), trained("c", start, "B", 5.0, 3)]
    norms = [change_norm(u, start, "B") for u in updates]
    assert norms[0] < 2.0 < norms[1] < norms[2]  # one client inside the bound, two clipped

    aggregated = aggregator.aggregate(updates, server_round=1)
    assert aggregated.info["dp_clipped"] == 2
    for module in MODULES:
        expected = sum(u.factors[module].B.double() * min(1.0, 2.0 / n) for u, n in zip(updates, norms)) / 4
        assert torch.allclose(aggregated.factors[module].B.double(), expected, atol=1e-6, rtol=1e-6)
        assert torch.equal(aggregated.factors[module].A, start[module].A)


def test_later_rounds_measure_each_change_from_the_global_adapter_the_clients_start_from():
    aggregator = dp("ffa", clip_norm=1e6, noise_multiplier=0.0, clients_per_round=2)
    drawn = aggregator.start_adapter("a", 1)
    aggregator.commit(1, GlobalUpdate({m: LoraFactors(f.A, torch.full_like(f.B, 0.5), f.scale)
                                       for m, f in drawn.items()}, merge=False))
    start = aggregator.start_adapter("a", 2)
    assert all(torch.equal(f.B, torch.full_like(f.B, 0.5)) for f in start.values())
    updates = [trained("a", start, "B", 1.0, 1), trained("b", start, "B", 1.0, 2)]
    aggregated = aggregator.aggregate(updates, server_round=2)
    for module in MODULES:  # unclipped, every sampled client in: the plain FedAvg mean
        mean = (updates[0].factors[module].B + updates[1].factors[module].B) / 2
        assert torch.allclose(aggregated.factors[module].B, mean, atol=1e-6)


def test_the_noise_has_standard_deviation_noise_multiplier_times_clip_over_clients_per_round():
    # Every client sends its start back unchanged, so the new B is the noise alone; 7.7k draws
    # give the sample standard deviation a relative standard error of 0.8 %.
    sigma, clip, per_round = 1.3, 0.7, 3
    aggregator = dp("ffa", clip, sigma, per_round, shapes={"q_proj": (1024, 8), "v_proj": (900, 8)})
    start = aggregator.start_adapter("a", 1)
    unchanged = [ClientUpdate(start, num_examples=5, client_id=c) for c in "ab"]
    noise = torch.cat([f.B.flatten() for f in aggregator.aggregate(unchanged, server_round=1).factors.values()])
    expected = sigma * clip / per_round
    assert noise.numel() == (1024 + 900) * RANK
    assert abs(noise.std().item() / expected - 1) < 0.05  # > 6 standard errors
    assert abs(noise.mean().item()) < 4 * expected / noise.numel() ** 0.5


def test_noise_is_reproducible_per_round_with_a_seed_and_fresh_without():
    def B(seed: int | None, server_round: int) -> torch.Tensor:
        aggregator = dp("ffa", 1.0, 1.0, 1, seed=seed)
        update = trained("a", aggregator.start_adapter("a", 1), "B", 1.0, 1)
        return aggregator.aggregate([update], server_round=server_round).factors["layer.0.q_proj"].B

    assert torch.equal(B(7, 1), B(7, 1))
    assert not torch.equal(B(7, 1), B(7, 2))
    assert not torch.equal(B(None, 1), B(None, 1))


def test_rolora_even_rounds_noise_A_and_keep_B():
    aggregator = dp("rolora", clip_norm=1.0, noise_multiplier=1.0, clients_per_round=2)
    drawn = aggregator.start_adapter("a", 1)
    aggregator.commit(1, GlobalUpdate({m: LoraFactors(f.A, torch.ones_like(f.B), f.scale) for m, f in drawn.items()},
                                      merge=False))
    start = aggregator.start_adapter("a", 2)
    updates = [trained(c, start, "A", 0.1, k) for k, c in enumerate("ab")]
    aggregated = aggregator.aggregate(updates, server_round=2)
    for module in MODULES:
        assert torch.equal(aggregated.factors[module].B, start[module].B)
        assert not torch.equal(aggregated.factors[module].A, start[module].A)


def test_fedsa_noises_the_shared_A_measured_from_one_server_drawn_start():
    aggregator = dp("fedsa", clip_norm=1e6, noise_multiplier=0.0, clients_per_round=2)
    start = aggregator.start_adapter("a", 1)  # one server-drawn LoRA (B = 0) every client starts from
    assert all(torch.equal(f.B, torch.zeros_like(f.B)) for f in start.values())
    assert all(torch.equal(f.A, g.A) for f, g in zip(start.values(), aggregator.start_adapter("b", 1).values()))
    updates = [trained(c, trained(c, start, "B", 0.3, k).factors, "A", 0.1, 10 + k) for k, c in enumerate("ab")]
    aggregated = aggregator.aggregate(updates, server_round=1)
    for module in MODULES:
        mean_A = (updates[0].factors[module].A + updates[1].factors[module].A) / 2  # unclipped, no noise
        assert torch.allclose(aggregated.factors[module].A, mean_A, atol=1e-6)


def test_methods_without_a_summed_factor_and_explicit_weights_are_refused():
    with pytest.raises(ValueError, match="stacking method broadcasts every client's own factors"):
        with_client_dp(get_aggregator("flora"), clip_norm=1.0, noise_multiplier=1.0, clients_per_round=2)
    aggregator = dp("ffa", 1.0, 1.0, 2)
    with pytest.raises(AggregationError, match="weights"):
        aggregator.aggregate([trained("a", aggregator.start_adapter("a", 1), "B", 1.0, 1)], [1.0], server_round=1)
