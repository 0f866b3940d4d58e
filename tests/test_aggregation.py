"""Aggregation methods against an independent float64 dense reference built in this file.

Clients carry random float32 factors with heterogeneous ranks (one above min(d, n)),
non-uniform α and rsLoRA scales. The reference Σ p_k s_k B_k A_k is computed here from the raw
tensors, α and rank, in float64, without library code.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import pytest
import torch

from fedlora.aggregation import (AggregationError, ClientUpdate, LoraFactors, available_aggregators,
                                 get_aggregator)
from fedlora.aggregation.factored import factored_svd, refactor

SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.self_attn.v_proj": (8, 10)}


@dataclass
class Client:
    """The raw material of one client update: factors per module, α, rank, rsLoRA, examples."""

    client_id: str
    rank: int
    alpha: float
    num_examples: int
    rslora: bool = False
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        return {module: (torch.randn(self.rank, n, generator=generator),
                         torch.randn(d, self.rank, generator=generator))
                for module, (d, n) in SHAPES.items()}


HETEROGENEOUS = [Client("big", 16, 32.0, 7, seed=1),             # rank 16 > min(d, n)
                 Client("rs", 4, 8.0, 30, rslora=True, seed=2),
                 Client("small", 2, 3.0, 13, seed=3)]
HOMOGENEOUS = [Client(f"c{k}", 4, 8.0, count, rslora=True, seed=10 + k) for k, count in enumerate((5, 17, 9))]


def to_updates(clients: list[Client], tensors: list[dict] | None = None) -> list[ClientUpdate]:
    tensors = tensors or [client.tensors() for client in clients]
    return [ClientUpdate({module: LoraFactors(A=A, B=B, scale=client.scale)
                          for module, (A, B) in raw.items()}, client.num_examples, client.client_id)
            for client, raw in zip(clients, tensors)]


def slots_of(updates: list[ClientUpdate]) -> list[tuple[str, dict[str, int]]]:
    """Accumulator slots for updates at hand: each client's ranks as sent."""
    return [(u.client_id, {module: factors.rank for module, factors in u.factors.items()}) for u in updates]


def reference_weights(clients: list[Client], weights: list[float] | None) -> list[float]:
    if weights is not None:
        return weights
    total = sum(client.num_examples for client in clients)
    return [client.num_examples / total for client in clients]


def dense_reference(clients: list[Client], weights: list[float] | None = None,
                    tensors: list[dict] | None = None) -> dict[str, torch.Tensor]:
    """Σ p_k s_k B_k A_k in float64, straight from the raw tensors."""
    tensors = tensors or [client.tensors() for client in clients]
    weights = reference_weights(clients, weights)
    return {module: sum(weight * client.scale * (raw[module][1].double() @ raw[module][0].double())
                        for client, raw, weight in zip(clients, tensors, weights))
            for module in SHAPES}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def max_error(result, reference: dict[str, torch.Tensor]) -> float:
    return max(relative_error(result.delta(module, torch.float64), expected)
               for module, expected in reference.items())


EXACT_SCENARIOS = {
    "heterogeneous": (HETEROGENEOUS, None),
    "one_client": (HETEROGENEOUS[:1], None),
    "explicit_uniform": (HETEROGENEOUS, [1 / 3] * 3),
}


@pytest.mark.parametrize("scenario", EXACT_SCENARIOS)
def test_flora_is_exact_for_any_ranks(scenario):
    clients, weights = EXACT_SCENARIOS[scenario]
    result = get_aggregator("flora").aggregate(to_updates(clients), weights)
    assert result.merge
    assert max_error(result, dense_reference(clients, weights)) <= 1e-6
    assert result.info["broadcast_rank"] == sum(client.rank for client in clients)


def test_flora_uses_explicit_weights_as_given():
    weights = [0.5, 2.0, 1.0]
    result = get_aggregator("flora").aggregate(to_updates(HETEROGENEOUS), weights)
    assert max_error(result, dense_reference(HETEROGENEOUS, weights)) <= 1e-6


def test_flora_exact_compression_keeps_the_update_at_minimal_rank():
    result = get_aggregator("flora", compress="exact").aggregate(to_updates(HETEROGENEOUS))
    assert max_error(result, dense_reference(HETEROGENEOUS)) <= 1e-5
    total_rank = sum(client.rank for client in HETEROGENEOUS)
    assert result.info["broadcast_rank"] <= min(*SHAPES["model.layers.0.self_attn.q_proj"], total_rank)
    for module, (d, n) in SHAPES.items():
        assert result.factors[module].rank <= min(d, n, total_rank)
    assert result.info["truncation_error"] <= 1e-6


def test_flora_rank_compression_reports_the_dense_svd_tail():
    rank = 3
    result = get_aggregator("flora", compress=rank).aggregate(to_updates(HETEROGENEOUS))
    tails = []
    for module, expected in dense_reference(HETEROGENEOUS).items():
        U, S, Vh = torch.linalg.svd(expected, full_matrices=False)
        tails.append((S[rank:].square().sum() / S.square().sum()).sqrt().item())
        best = U[:, :rank] * S[:rank] @ Vh[:rank]
        assert result.factors[module].rank == rank
        assert relative_error(result.delta(module, torch.float64), best) <= 1e-5
    assert result.info["truncation_error"] == pytest.approx(max(tails), rel=1e-5)
    assert result.info["broadcast_rank"] == rank


def test_flora_shuffle_permutes_blocks_but_not_the_update():
    updates = to_updates(HETEROGENEOUS)
    plain = get_aggregator("flora").aggregate(updates)
    shuffled = get_aggregator("flora", shuffle=3).aggregate(updates)
    again = get_aggregator("flora", shuffle=3).aggregate(updates)
    module = next(iter(SHAPES))
    assert not torch.equal(plain.factors[module].B, shuffled.factors[module].B)
    assert torch.equal(shuffled.factors[module].B, again.factors[module].B)
    for module in SHAPES:
        assert relative_error(shuffled.delta(module), plain.delta(module, torch.float64)) <= 1e-6


@pytest.mark.parametrize("options", [{}, {"shuffle": 5}, {"compress": "exact"}])
def test_flora_accumulator_filling_slots_equals_aggregate_concatenating_bit_for_bit(options):
    updates = to_updates(HETEROGENEOUS)
    stacking = get_aggregator("flora", **options).accumulator(slots_of(updates))
    for update in updates:
        stacking.add(update)
    result, expected = stacking.result(), get_aggregator("flora", **options).aggregate(updates)
    for module in SHAPES:
        assert torch.equal(result.factors[module].A, expected.factors[module].A)
        assert torch.equal(result.factors[module].B, expected.factors[module].B)


def test_flora_copies_each_added_update_into_the_stack_and_keeps_no_reference_to_it():
    tensors = [client.tensors() for client in HETEROGENEOUS]
    updates = to_updates(HETEROGENEOUS, tensors)
    stacking = get_aggregator("flora").accumulator(slots_of(updates))
    held = [weakref.ref(factors.A) for update in updates for factors in update.factors.values()]
    for update in updates:
        stacking.add(update)
    del update, updates, tensors  # the caller keeps nothing
    assert all(ref() is None for ref in held), "an added update's factors are not kept"
    assert max_error(stacking.result(), dense_reference(HETEROGENEOUS)) <= 1e-6
    with pytest.raises(RuntimeError, match="taken once"):  # its buffers are now the result's
        stacking.result()


@pytest.mark.parametrize("name, options", [("flora", {}), ("flora", {"shuffle": 5}), ("flora", {"compress": "exact"}),
                                           ("zeropad", {}), ("flexlora", {})])
def test_an_accumulator_missing_or_dropping_clients_equals_aggregating_the_rest(name, options):
    updates = to_updates(HETEROGENEOUS)
    accumulator = get_aggregator(name, **options).accumulator(slots_of(updates) + [("late", {})])
    for update in reversed(updates):  # arrival order does not matter: the slots fix the order
        accumulator.add(update)
    accumulator.drop("rs")  # and "late" never arrives
    result = accumulator.result()
    expected = get_aggregator(name, **options).aggregate([updates[0], updates[2]])
    for module in SHAPES:
        assert torch.equal(result.factors[module].A, expected.factors[module].A), (name, module)
        assert torch.equal(result.factors[module].B, expected.factors[module].B), (name, module)


def test_an_accumulator_refuses_a_client_without_a_free_slot():
    updates = to_updates(HETEROGENEOUS)
    for name in ("flora", "zeropad"):
        accumulator = get_aggregator(name).accumulator(slots_of(updates[:1]))
        accumulator.add(updates[0])
        for intruder in (updates[0], updates[1]):  # a second update, and one never expected
            with pytest.raises(AggregationError) as error:
                accumulator.add(intruder)
            assert error.value.rule == "unexpected" and error.value.client_id == intruder.client_id


def test_flora_stacking_refuses_a_rank_other_than_its_slot():
    updates = to_updates(HETEROGENEOUS)
    stacking = get_aggregator("flora").accumulator([("big", dict.fromkeys(SHAPES, 8))])
    with pytest.raises(AggregationError) as error:
        stacking.add(updates[0])  # rank 16
    assert error.value.rule == "shape" and "expected 8" in str(error.value)


@pytest.mark.parametrize("compress", ["lossy", 0, -2, True, 2.5])
def test_flora_rejects_bad_compress(compress):
    with pytest.raises(ValueError, match="compress"):
        get_aggregator("flora", compress=compress)


def factor_average(clients: list[Client], tensors: list[dict], module: str, fold_scale: bool):
    """The definition of factor averaging: Σ p_k A_k and Σ p_k (s_k) B_k, zero-padded to the top rank."""
    (d, n), top = SHAPES[module], max(client.rank for client in clients)
    A_mean = torch.zeros(top, n, dtype=torch.float64)
    B_mean = torch.zeros(d, top, dtype=torch.float64)
    for client, raw, weight in zip(clients, tensors, reference_weights(clients, None)):
        A_mean[:client.rank] += weight * raw[module][0].double()
        B_mean[:, :client.rank] += weight * (client.scale if fold_scale else 1.0) * raw[module][1].double()
    return A_mean, B_mean


# FedIT averages at the common scale; ZeroPad folds each client's scale into B, global scale 1.
@pytest.mark.parametrize("name, clients, fold_scale", [("fedit", HOMOGENEOUS, False),
                                                       ("zeropad", HETEROGENEOUS, True)])
def test_factor_averages_match_their_definition_and_not_the_update_average(name, clients, fold_scale):
    tensors = [client.tensors() for client in clients]
    result = get_aggregator(name).aggregate(to_updates(clients, tensors))
    assert not result.merge
    reference = dense_reference(clients, tensors=tensors)
    for module in SHAPES:
        A_mean, B_mean = factor_average(clients, tensors, module, fold_scale)
        factors = result.factors[module]
        assert factors.scale == (1.0 if fold_scale else clients[0].scale)
        assert relative_error(factors.A, A_mean) <= 1e-6
        assert relative_error(factors.B, B_mean) <= 1e-6
        # The cross terms p_j p_k B_j A_k that FLoRA removes.
        assert relative_error(result.delta(module), reference[module]) > 1e-2


def test_fedit_normalises_explicit_weights():
    updates = to_updates(HOMOGENEOUS)
    scaled = get_aggregator("fedit").aggregate(updates, [2.0, 2.0, 2.0])
    uniform = get_aggregator("fedit").aggregate(updates, [1 / 3] * 3)
    for module in SHAPES:
        assert relative_error(scaled.delta(module), uniform.delta(module, torch.float64)) <= 1e-6


def test_zeropad_client_starts_from_its_leading_components():
    aggregator = get_aggregator("zeropad")
    result = aggregator.aggregate(to_updates(HETEROGENEOUS))
    start = aggregator.client_start(result, "small", rank=2)
    for module, factors in start.items():
        assert factors.rank == 2 and factors.scale == result.factors[module].scale
        assert torch.equal(factors.A, result.factors[module].A[:2])
        assert torch.equal(factors.B, result.factors[module].B[:, :2])


def with_shared(clients: list[Client], frozen: str) -> list[dict]:
    """Raw tensors where every client holds the first client's ``frozen`` factor."""
    tensors = [client.tensors() for client in clients]
    index = 0 if frozen == "A" else 1
    for raw in tensors[1:]:
        for module in SHAPES:
            pair = list(raw[module])
            pair[index] = tensors[0][module][index].clone()
            raw[module] = tuple(pair)
    return tensors


def test_ffa_is_exact_with_a_shared_frozen_a():
    tensors = with_shared(HOMOGENEOUS, "A")
    aggregator = get_aggregator("ffa")
    assert aggregator.trainable(1) == aggregator.trainable(2) == {"B"}
    result = aggregator.aggregate(to_updates(HOMOGENEOUS, tensors))
    assert max_error(result, dense_reference(HOMOGENEOUS, tensors=tensors)) <= 1e-6


@pytest.mark.parametrize("server_round, trained", [(1, "B"), (2, "A"), (3, "B")])
def test_rolora_alternates_and_is_exact(server_round, trained):
    aggregator = get_aggregator("rolora")
    assert aggregator.trainable(server_round) == {trained}
    tensors = with_shared(HOMOGENEOUS, "A" if trained == "B" else "B")
    result = aggregator.aggregate(to_updates(HOMOGENEOUS, tensors), server_round=server_round)
    assert result.info["phase"] == trained
    assert max_error(result, dense_reference(HOMOGENEOUS, tensors=tensors)) <= 1e-6
    fixed = get_aggregator("rolora", phase=trained).aggregate(to_updates(HOMOGENEOUS, tensors))
    assert max_error(fixed, dense_reference(HOMOGENEOUS, tensors=tensors)) <= 1e-6


def test_rolora_needs_a_round_or_a_phase():
    with pytest.raises(AggregationError, match="server_round"):
        get_aggregator("rolora").aggregate(to_updates(HOMOGENEOUS, with_shared(HOMOGENEOUS, "A")))
    with pytest.raises(ValueError, match="phase"):
        get_aggregator("rolora", phase="C")


@pytest.mark.parametrize("name", ["ffa", "rolora"])
def test_frozen_factor_must_be_identical(name):
    with pytest.raises(AggregationError, match="frozen factor A") as error:
        get_aggregator(name).aggregate(to_updates(HOMOGENEOUS), server_round=1)
    assert "'c1'" in str(error.value) and "q_proj" in str(error.value)


def test_flexlora_global_is_exact_and_clients_get_the_dense_svd_truncation():
    aggregator = get_aggregator("flexlora")
    result = aggregator.aggregate(to_updates(HETEROGENEOUS))
    reference = dense_reference(HETEROGENEOUS)
    assert not result.merge
    assert max_error(result, reference) <= 1e-5
    worst = 0.0
    for module, expected in reference.items():
        U, S, Vh = torch.linalg.svd(expected, full_matrices=False)
        assert result.factors[module].rank <= min(*SHAPES[module], sum(c.rank for c in HETEROGENEOUS))
        for client in HETEROGENEOUS:
            rank = min(client.rank, S.numel())
            truncated = U[:, :rank] * S[:rank] @ Vh[:rank]
            factors = result.client_factors[client.client_id][module]
            assert factors.rank == rank
            assert relative_error(factors.delta(), truncated) <= 1e-5
            worst = max(worst, (S[rank:].square().sum() / S.square().sum()).sqrt().item())
    assert result.info["truncation_error"] == pytest.approx(worst, rel=1e-5)
    assert aggregator.client_start(result, "rs", 4) is result.client_factors["rs"]
    newcomer = aggregator.client_start(result, "newcomer", rank=3)
    for module, expected in reference.items():
        U, S, Vh = torch.linalg.svd(expected, full_matrices=False)
        assert relative_error(newcomer[module].delta(), U[:, :3] * S[:3] @ Vh[:3]) <= 1e-5


def test_flexlora_rejects_duplicate_client_ids():
    updates = to_updates(HETEROGENEOUS[:2])
    updates[1].client_id = updates[0].client_id
    with pytest.raises(AggregationError, match="more than one update"):
        get_aggregator("flexlora").aggregate(updates)


FEDEX_SCENARIOS = {"unequal_examples": (HOMOGENEOUS, None), "explicit_uniform": (HOMOGENEOUS, [1 / 3] * 3),
                   "one_client": (HOMOGENEOUS[:1], None)}


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("scenario", FEDEX_SCENARIOS)
def test_fedex_average_plus_residual_is_exact(compact, scenario):
    clients, weights = FEDEX_SCENARIOS[scenario]
    tensors = [client.tensors() for client in clients]
    updates = to_updates(clients, tensors)
    result = get_aggregator("fedex", compact_residual=compact).aggregate(updates, weights)
    assert not result.merge
    assert max_error(result, dense_reference(clients, weights, tensors)) <= (1e-5 if compact else 1e-6)
    fedit = get_aggregator("fedit").aggregate(updates, weights)
    for module, (d, n) in SHAPES.items():
        assert torch.equal(result.factors[module].A, fedit.factors[module].A)
        if compact:
            assert result.residual[module].rank <= min(d, n)


def test_factored_svd_matches_the_dense_svd():
    A, B = torch.randn(16, 10, dtype=torch.float64), torch.randn(12, 16, dtype=torch.float64)
    U, S, Vh = factored_svd(B, A)
    assert torch.allclose(S, torch.linalg.svdvals(B @ A), rtol=1e-10)
    assert torch.allclose(U * S @ Vh, B @ A, atol=1e-10)
    assert U.dtype == torch.float64 and factored_svd(B.float(), A.float())[0].dtype == torch.float32


def test_refactor_drops_only_numerically_zero_directions():
    base = torch.randn(3, 10)
    A = torch.cat([base, base])                   # rank 6 factors of a rank-3 update
    B = torch.randn(12, 6)
    factors, error = refactor(LoraFactors(A=A, B=B, scale=0.5))
    assert factors.rank == 3 and error < 1e-6
    assert relative_error(factors.delta(), 0.5 * B.double() @ A.double()) <= 1e-5
    zero, error = refactor(LoraFactors(A=torch.zeros(4, 10), B=torch.zeros(12, 4)))
    assert zero.rank == 1 and error == 0.0 and not zero.delta().any()


MODULE = next(iter(SHAPES))


def corrupt_nan(updates):
    updates[1].factors[MODULE].B[0, 0] = float("nan")


def corrupt_inf(updates):
    updates[1].factors[MODULE].A[0, 0] = float("inf")


def corrupt_rank(updates):
    factors = updates[1].factors[MODULE]
    updates[1].factors[MODULE] = LoraFactors(A=factors.A, B=factors.B[:, :-1], scale=factors.scale)


def corrupt_modules(updates):
    del updates[1].factors[MODULE]


def corrupt_shape(updates):
    factors = updates[1].factors[MODULE]
    updates[1].factors[MODULE] = LoraFactors(A=factors.A[:, :-1], B=factors.B, scale=factors.scale)


CORRUPTIONS = {"nan": corrupt_nan, "inf": corrupt_inf, "rank_mismatch": corrupt_rank,
               "module_set": corrupt_modules, "shape": corrupt_shape}


@pytest.mark.parametrize("name", available_aggregators())
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_updates_are_rejected_naming_client_and_module(name, corruption):
    updates = to_updates(HOMOGENEOUS, with_shared(HOMOGENEOUS, "A"))
    CORRUPTIONS[corruption](updates)
    with pytest.raises(AggregationError) as error:
        get_aggregator(name).aggregate(updates, server_round=1)
    assert "client 'c1'" in str(error.value) and f"module {MODULE!r}" in str(error.value)


@pytest.mark.parametrize("name", available_aggregators())
@pytest.mark.parametrize("count", [0, -3])
def test_non_positive_example_counts_are_rejected(name, count):
    updates = to_updates(HOMOGENEOUS, with_shared(HOMOGENEOUS, "A"))
    updates[2].num_examples = count
    with pytest.raises(AggregationError, match="num_examples") as error:
        get_aggregator(name).aggregate(updates, server_round=1)
    assert "client 'c2'" in str(error.value)


@pytest.mark.parametrize("name", available_aggregators())
def test_empty_round_is_rejected(name):
    with pytest.raises(AggregationError, match="no client updates"):
        get_aggregator(name).aggregate([], server_round=1)


@pytest.mark.parametrize("name", ["fedit", "fedex", "ffa", "rolora"])
def test_homogeneous_methods_reject_mixed_ranks_and_suggest_exact_ones(name):
    with pytest.raises(AggregationError) as error:
        get_aggregator(name).aggregate(to_updates(HETEROGENEOUS), server_round=1)
    message = str(error.value)
    assert "client 'rs'" in message and f"module {MODULE!r}" in message
    assert "'flora'" in message and "'zeropad'" in message
    assert error.value.rule == "heterogeneous"


def test_homogeneous_methods_declare_it():
    flags = {name: get_aggregator(name).heterogeneous_ranks for name in available_aggregators()}
    assert flags == {"flora": True, "flora-warm": True, "flora-adalora": True, "fedit": False, "zeropad": True, "ffa": False, "rolora": False,
                     "flexlora": True, "fedex": False, "fedsa": False, "lorafair": False, "florist": True,
                     "hetlora": True, "raflora": True, "fedsvd": False, "florana": False, "fedmomentum": False,
                     "ravan": False, "fedplora": True,
                     "centralized": True, "local": True}


@pytest.mark.parametrize("method", ["zeropad", "flexlora"])
def test_a_client_of_larger_rank_than_the_global_gets_trainable_extra_components(method):
    """Partial participation: the global was formed from ranks 2 and 1; a rank-4 client joins."""
    torch.manual_seed(3)
    updates = [ClientUpdate({"m": LoraFactors(torch.randn(r, 10), torch.randn(12, r), 2.0)}, 5, cid)
               for cid, r in (("small", 2), ("smaller", 1))]
    aggregator = get_aggregator(method)
    global_update = aggregator.aggregate(updates)
    start = aggregator.client_start(global_update, "late", 4)["m"]
    assert start.rank == 4
    assert torch.allclose(start.delta(torch.float64), global_update.delta("m", torch.float64), atol=1e-6)
    extra = slice(global_update.factors["m"].rank, 4)
    assert start.A[extra].abs().min() > 0 and start.B[:, extra].abs().max() == 0
