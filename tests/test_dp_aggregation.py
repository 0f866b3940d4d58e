"""Client-level DP (DP-FedAvg) around FFA-LoRA and RoLoRA: clipping and noise, as tensor math."""

from __future__ import annotations

import pytest
import torch

from fedlora.aggregation import AggregationError, ClientUpdate, GlobalUpdate, LoraFactors, get_aggregator
from fedlora.aggregation.dp import ClientLevelDP

MODULES = {"layer.0.q_proj": (48, 40), "layer.0.v_proj": (24, 40)}
RANK = 4


def shared_A(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {module: torch.randn(RANK, n, generator=generator) for module, (d, n) in MODULES.items()}


def update(client: str, A: dict[str, torch.Tensor], B_scale: float, seed: int) -> ClientUpdate:
    generator = torch.Generator().manual_seed(seed)
    factors = {module: LoraFactors(A[module], B_scale * torch.randn(d, RANK, generator=generator), scale=2.0)
               for module, (d, n) in MODULES.items()}
    return ClientUpdate(factors, num_examples=10 + seed, client_id=client)


def dp_ffa(clip_norm: float, noise_multiplier: float, clients_per_round: int, seed: int | None = 7) -> ClientLevelDP:
    return ClientLevelDP(get_aggregator("ffa"), clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                         clients_per_round=clients_per_round, noise_seed=seed)


def test_each_client_change_is_clipped_jointly_over_modules_and_divided_by_clients_per_round():
    A = shared_A()
    updates = [update("a", A, 0.01, 1), update("b", A, 1.0, 2), update("c", A, 5.0, 3)]
    clip = 2.0
    aggregated = dp_ffa(clip, 0.0, clients_per_round=4).aggregate(updates, server_round=1)

    expected = {module: torch.zeros(d, RANK, dtype=torch.float64) for module, (d, n) in MODULES.items()}
    for u in updates:  # start is LoRA's B = 0, so the change is B itself
        norm = sum(u.factors[m].B.double().square().sum() for m in MODULES).sqrt()
        for module in MODULES:
            expected[module] += u.factors[module].B.double() * min(1.0, clip / float(norm))
    norms = [float(sum(u.factors[m].B.double().square().sum() for m in MODULES).sqrt()) for u in updates]
    assert norms[0] < clip < norms[1] < norms[2]  # one client inside the bound, two clipped
    assert aggregated.info["dp_clipped"] == 2
    for module in MODULES:
        assert torch.allclose(aggregated.factors[module].B.double(), expected[module] / 4, atol=1e-6, rtol=1e-6)
        assert torch.equal(aggregated.factors[module].A, A[module])


def test_later_rounds_measure_each_change_from_the_adapter_the_clients_started_from():
    A = shared_A()
    start = {m: LoraFactors(A[m], torch.full((d, RANK), 0.5), 2.0) for m, (d, n) in MODULES.items()}
    aggregator = dp_ffa(clip_norm=1e6, noise_multiplier=0.0, clients_per_round=2)
    assert aggregator.client_start(GlobalUpdate(start, merge=False), "a", RANK) == start
    updates = [update("a", A, 1.0, 1), update("b", A, 1.0, 2)]
    aggregated = aggregator.aggregate(updates, server_round=2)
    for module in MODULES:  # unclipped, all clients in: the plain FedAvg mean
        mean = (updates[0].factors[module].B + updates[1].factors[module].B) / 2
        assert torch.allclose(aggregated.factors[module].B, mean, atol=1e-6)


def test_the_noise_has_standard_deviation_noise_multiplier_times_clip_over_clients_per_round():
    # Every client sends its start back unchanged, so the new B is the noise alone; ~7.7k draws
    # give the sample standard deviation a relative standard error of 0.8 %.
    tall = {"q_proj": 1024, "v_proj": 900}  # rows of B; A is a shared 4×8
    zero = [ClientUpdate({m: LoraFactors(torch.ones(RANK, 8), torch.zeros(d, RANK), 2.0) for m, d in tall.items()},
                         num_examples=5, client_id=c) for c in "ab"]
    sigma, clip, per_round = 1.3, 0.7, 3
    noise = torch.cat([factors.B.flatten() for factors in
                       dp_ffa(clip, sigma, per_round).aggregate(zero, server_round=1).factors.values()])
    expected = sigma * clip / per_round
    assert noise.numel() > 7000
    assert abs(noise.std().item() / expected - 1) < 0.05  # > 6 standard errors
    assert abs(noise.mean().item()) < 4 * expected / noise.numel() ** 0.5


def test_noise_is_reproducible_per_round_with_a_seed_and_fresh_without():
    A = shared_A()
    updates = [update("a", A, 1.0, 1)]

    def B(aggregator, server_round):
        return aggregator.aggregate(updates, server_round=server_round).factors["layer.0.q_proj"].B

    assert torch.equal(B(dp_ffa(1.0, 1.0, 1), 1), B(dp_ffa(1.0, 1.0, 1), 1))
    assert not torch.equal(B(dp_ffa(1.0, 1.0, 1), 1), B(dp_ffa(1.0, 1.0, 1), 2))
    assert not torch.equal(B(dp_ffa(1.0, 1.0, 1, seed=None), 1), B(dp_ffa(1.0, 1.0, 1, seed=None), 1))


def test_rolora_even_rounds_noise_A_and_keep_B():
    A = shared_A()
    start = {m: LoraFactors(A[m], torch.ones(d, RANK), 2.0) for m, (d, n) in MODULES.items()}
    aggregator = ClientLevelDP(get_aggregator("rolora"), clip_norm=1.0, noise_multiplier=1.0, clients_per_round=2,
                               noise_seed=0)
    aggregator.client_start(GlobalUpdate(start, merge=False), "a", RANK)
    trained = [ClientUpdate({m: LoraFactors(A[m] + 0.1 * k, start[m].B, 2.0) for m in MODULES}, 5, f"c{k}")
               for k in range(2)]
    aggregated = aggregator.aggregate(trained, server_round=2)
    for module in MODULES:
        assert torch.equal(aggregated.factors[module].B, start[module].B)
        assert not torch.equal(aggregated.factors[module].A, A[module])


def test_methods_that_do_not_sum_one_factor_and_explicit_weights_are_refused():
    with pytest.raises(ValueError, match="weighted sum of one trained factor"):
        ClientLevelDP(get_aggregator("flora"), clip_norm=1.0, noise_multiplier=1.0, clients_per_round=2)
    A = shared_A()
    with pytest.raises(AggregationError, match="weights"):
        dp_ffa(1.0, 1.0, 2).aggregate([update("a", A, 1.0, 1)], [1.0], server_round=1)
