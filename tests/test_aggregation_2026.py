"""FedSA-LoRA, LoRA-FAIR, FLoRIST, HetLoRA and raFLoRA against float64 dense computations of their definitions.

Each reference is built here from the updates' raw tensors and scales, in float64, without
library code: dense matrices, torch.linalg.svd / pinv. Where a method is not Σ p_k ΔW_k, the
test shows by how much it is not.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedlora.aggregation import AggregationError, ClientUpdate, LoraFactors, Regularizer, RunContext, get_aggregator
from fedlora.aggregation.hetlora import kept_rank, self_pruned_rank, tail_norm

SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.self_attn.v_proj": (8, 10)}
MODULE = next(iter(SHAPES))


def random_update(client_id: str, rank: int, scale: float, num_examples: int, seed: int) -> ClientUpdate:
    generator = torch.Generator().manual_seed(seed)
    return ClientUpdate({module: LoraFactors(A=torch.randn(rank, n, generator=generator),
                                             B=torch.randn(d, rank, generator=generator), scale=scale)
                         for module, (d, n) in SHAPES.items()}, num_examples, client_id)


def heterogeneous() -> list[ClientUpdate]:
    """Ranks 16 (> min(d, n)), 4 and 2 with their own scales (α/r, rsLoRA α/√r, α/r)."""
    return [random_update("big", 16, 32 / 16, 7, seed=1), random_update("rs", 4, 8 / 2, 30, seed=2),
            random_update("small", 2, 3 / 2, 13, seed=3)]


def homogeneous(seed: int = 10) -> list[ClientUpdate]:
    return [random_update(f"c{k}", 4, 8 / 2, count, seed=seed + k) for k, count in enumerate((5, 17, 9))]


def shares(updates: list[ClientUpdate]) -> list[float]:
    total = sum(update.num_examples for update in updates)
    return [update.num_examples / total for update in updates]


def dense(update: ClientUpdate, module: str, columns: slice = slice(None)) -> torch.Tensor:
    """s_k B_k A_k in float64, optionally of a range of rank components only."""
    factors = update.factors[module]
    return factors.scale * (factors.B.double()[:, columns] @ factors.A.double()[columns])


def ideal(updates: list[ClientUpdate], module: str) -> torch.Tensor:
    """Σ p_k s_k B_k A_k with example shares."""
    return sum(p * dense(update, module) for update, p in zip(updates, shares(updates)))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def svd_truncation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :rank] * S[:rank] @ Vh[:rank]


def padded(tensor: torch.Tensor, rank: int, rank_dim: int) -> torch.Tensor:
    pad = [0, 0, 0, rank - tensor.shape[0]] if rank_dim == 0 else [0, rank - tensor.shape[1]]
    return torch.nn.functional.pad(tensor.double(), pad)


# -- FedSA-LoRA -----------------------------------------------------------------------------

def test_fedsa_averages_only_A_and_holds_no_B():
    updates = homogeneous()
    aggregator = get_aggregator("fedsa")
    assert aggregator.uploads(1) == {"A"} and aggregator.kept_on_client == {"B"}
    assert aggregator.trainable(1) == {"A", "B"}  # both are trained, only A travels
    result = aggregator.aggregate(updates)
    assert not result.merge and not result.client_factors
    for module in SHAPES:
        A_mean = sum(p * update.factors[module].A.double() for update, p in zip(updates, shares(updates)))
        assert relative_error(result.factors[module].A, A_mean) <= 1e-6
        assert not result.factors[module].B.any()  # the clients' B's stay with them
        assert result.factors[module].scale == updates[0].factors[module].scale


def test_fedsa_starts_every_client_from_the_global_A_and_evaluates_one_model_per_client():
    context = RunContext(ranks={"c0": 4, "c1": 4, "c2": 4}, scales=dict.fromkeys(("c0", "c1", "c2"), 2.0),
                         shapes=SHAPES, seed=5)
    aggregator = get_aggregator("fedsa")
    aggregator.setup(context)
    assert aggregator.evaluation_adapters() == dict.fromkeys(context.ranks)  # before round 1: the base
    first = {cid: aggregator.start_adapter(cid, 1) for cid in context.ranks}
    for module, (d, n) in SHAPES.items():  # one A drawn from the run's seed for all, and a fresh B
        assert first["c0"][module].A.shape == (4, n) and first["c0"][module].A.any()
        assert all(torch.equal(start[module].A, first["c0"][module].A) and not start[module].B.any()
                   for start in first.values())
    aggregator.commit(1, aggregator.aggregate(homogeneous()))
    shared = aggregator.global_update.factors
    for cid in context.ranks:
        start = aggregator.start_adapter(cid, 2)
        assert all(torch.equal(start[m].A, shared[m].A) and not start[m].B.any() for m in SHAPES)
    assert aggregator.evaluation_adapters() == dict.fromkeys(context.ranks, shared)

    restored = get_aggregator("fedsa")
    restored.setup(context)
    restored.load_state_dict(aggregator.state_dict())
    assert all(torch.equal(restored.start_adapter("c1", 2)[m].A, shared[m].A) for m in SHAPES)


def test_fedsa_rejects_duplicate_client_ids():
    updates = homogeneous()[:2]
    updates[1].client_id = updates[0].client_id
    with pytest.raises(AggregationError, match="more than one update"):
        get_aggregator("fedsa").aggregate(updates)


# -- LoRA-FAIR -------------------------------------------------------------------------------

@pytest.mark.parametrize("ridge", [0.0, 0.5])
def test_lorafair_correction_is_the_regularised_least_squares_optimum(ridge):
    updates = homogeneous()
    result = get_aggregator("lorafair", ridge=ridge).aggregate(updates)
    fedit = get_aggregator("fedit").aggregate(updates)
    assert not result.merge
    s, p, worst_fedit, worst = updates[0].factors[MODULE].scale, shares(updates), 0.0, 0.0
    for module in SHAPES:
        target = ideal(updates, module)
        A_mean = sum(w * update.factors[module].A.double() for update, w in zip(updates, p))
        B_mean = sum(w * update.factors[module].B.double() for update, w in zip(updates, p))
        # minimise ‖T − s(B̄ + ΔB)Ā‖² + ridge‖sΔB‖²: sΔB = (T − sB̄Ā)Āᵀ(ĀĀᵀ + ridge·I)⁻¹
        s_delta = (target - s * B_mean @ A_mean) @ A_mean.T @ torch.linalg.inv(
            A_mean @ A_mean.T + ridge * torch.eye(A_mean.shape[0], dtype=torch.float64))
        factors = result.factors[module]
        assert torch.equal(factors.A, fedit.factors[module].A) and factors.scale == s
        assert relative_error(factors.B, B_mean + s_delta / s) <= 1e-5
        corrected = s * factors.B.double() @ A_mean
        if ridge == 0:  # least squares: the residual is orthogonal to Ā's rows
            assert ((target - corrected) @ A_mean.T).norm() <= 1e-6 * target.norm() * A_mean.norm()
        worst_fedit = max(worst_fedit, relative_error(fedit.delta(module), target))
        worst = max(worst, relative_error(corrected, target))
    assert result.info["fedit_error"] == pytest.approx(worst_fedit, rel=1e-5)
    assert result.info["residual_error"] == pytest.approx(worst, rel=1e-4)
    assert 1e-2 < result.info["residual_error"] < result.info["fedit_error"]  # better than FedIT, not exact


def test_lorafair_is_exact_for_one_client_and_takes_the_minimum_norm_correction():
    update = homogeneous()[0]
    result = get_aggregator("lorafair").aggregate([update])
    assert result.info["residual_error"] <= 1e-6
    for module in SHAPES:
        assert relative_error(result.delta(module), dense(update, module)) <= 1e-6

    # Ā with dependent rows (and float32 round-off in the dependence): the minimum-norm ΔB, not a blow-up
    generator = torch.Generator().manual_seed(5)
    A = torch.randn(2, 10, generator=generator, dtype=torch.float64)
    A = torch.cat([A, A[:1] + A[1:]])                       # rank 2, three rows
    E = torch.randn(3, 10, generator=generator, dtype=torch.float64)
    pair = [ClientUpdate({"m": LoraFactors((A + sign * E).float(), torch.randn(12, 3, generator=generator), 2.0)},
                         1, f"t{sign}") for sign in (1, -1)]
    got = get_aggregator("lorafair").aggregate(pair).factors["m"]
    A_mean = sum(update.factors["m"].A.double() for update in pair) / 2
    B_mean = sum(update.factors["m"].B.double() for update in pair) / 2
    target = sum(dense(update, "m") for update in pair) / 2
    assert torch.linalg.matrix_rank(A_mean, rtol=1e-5) == 2
    expected = B_mean + (target / 2.0 - B_mean @ A_mean) @ torch.linalg.pinv(A_mean, rtol=1e-5)
    assert relative_error(got.B, expected) <= 1e-5


@pytest.mark.parametrize("ridge", [-1.0, float("nan"), float("inf")])
def test_lorafair_rejects_a_bad_ridge(ridge):
    with pytest.raises(ValueError, match="ridge"):
        get_aggregator("lorafair", ridge=ridge)


# -- FLoRIST ----------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99, 1.0])
def test_florist_keeps_the_fewest_singular_values_reaching_the_energy_threshold(threshold):
    updates = heterogeneous()
    result = get_aggregator("florist", threshold=threshold).aggregate(updates)
    assert result.merge  # one global pair, merged; clients start fresh LoRAs of their own ranks
    tails, ranks = [], []
    for module in SHAPES:
        target = ideal(updates, module)
        S = torch.linalg.svdvals(target)
        energy = S.square() / S.square().sum()
        rank = next(k for k in range(1, S.numel() + 1) if energy[:k].sum() >= threshold - 1e-12)
        assert result.factors[module].rank == rank
        assert relative_error(result.delta(module), svd_truncation(target, rank)) <= 1e-5
        tail = energy[rank:].sum().sqrt().item()
        assert relative_error(result.delta(module), target) == pytest.approx(tail, abs=1e-5)
        assert tail <= math.sqrt(1 - threshold) + 1e-6
        tails.append(tail)
        ranks.append(rank)
    assert result.info["broadcast_rank"] == max(ranks)
    assert result.info["truncation_error"] == pytest.approx(max(tails), abs=1e-6)
    if threshold == 1.0:  # everything kept: exact, at the numerical rank min(d, n, Σr)
        assert ranks == [min(*SHAPES[module], 16 + 4 + 2) for module in SHAPES]
    else:
        assert min(tails) > 0  # the truncation the threshold buys


def test_florist_accumulator_and_shuffle_give_the_aggregate():
    updates = heterogeneous()
    expected = get_aggregator("florist").aggregate(updates)
    stacking = get_aggregator("florist").accumulator(
        [(u.client_id, {m: f.rank for m, f in u.factors.items()}) for u in updates])
    for update in updates:
        stacking.add(update)
    filled = stacking.result()
    shuffled = get_aggregator("florist", shuffle=4).aggregate(updates)
    for module in SHAPES:
        assert torch.equal(filled.factors[module].B, expected.factors[module].B)
        assert relative_error(shuffled.delta(module), expected.delta(module, torch.float64)) <= 1e-5


@pytest.mark.parametrize("threshold", [0, -0.1, 1.5, True, "0.9"])
def test_florist_rejects_a_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        get_aggregator("florist", threshold=threshold)


# -- HetLoRA ----------------------------------------------------------------------------------

def norm_weighted_average(updates: list[ClientUpdate], module: str,
                          given: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """HetLoRA's definition: zero-pad, weight by given_k·‖s_k B_k A_k‖_F (normalised), average; s_k into B."""
    top = max(update.factors[module].rank for update in updates)
    norms = [g * dense(update, module).norm().item() for update, g in zip(updates, given)]
    weights = [n / sum(norms) for n in norms]
    A = sum(w * padded(update.factors[module].A, top, 0) for update, w in zip(updates, weights))
    B = sum(w * update.factors[module].scale * padded(update.factors[module].B, top, 1)
            for update, w in zip(updates, weights))
    return A, B


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_hetlora_weights_clients_by_their_update_norms(weights):
    updates = heterogeneous()
    result = get_aggregator("hetlora").aggregate(updates, weights)
    zeropad = get_aggregator("zeropad").aggregate(updates)
    assert not result.merge
    for module in SHAPES:
        A, B = norm_weighted_average(updates, module, weights or [1.0] * 3)
        factors = result.factors[module]
        assert factors.scale == 1.0 and factors.rank == 16
        assert relative_error(factors.A, A) <= 1e-6 and relative_error(factors.B, B) <= 1e-6
        # not the example-share average, and FedIT's cross terms remain
        assert relative_error(factors.A, zeropad.factors[module].A.double()) > 1e-2
        assert relative_error(result.delta(module), ideal(updates, module)) > 1e-2


def test_hetlora_distributes_by_truncation_and_falls_back_to_uniform_for_zero_updates():
    aggregator = get_aggregator("hetlora")
    result = aggregator.aggregate(heterogeneous())
    start = aggregator.client_start(result, "small", 2)
    for module, factors in start.items():
        assert torch.equal(factors.A, result.factors[module].A[:2])
        assert torch.equal(factors.B, result.factors[module].B[:, :2])
    silent = heterogeneous()
    for update in silent:
        for factors in update.factors.values():
            factors.B.zero_()
    uniform = aggregator.aggregate(silent)
    for module in SHAPES:
        expected = sum(padded(update.factors[module].A, 16, 0) for update in silent) / 3
        assert relative_error(uniform.factors[module].A, expected) <= 1e-6


def test_hetlora_tail_norm_is_the_dense_norm_of_the_components_pruning_drops():
    update = heterogeneous()[1]  # rank 4
    factors = update.factors[MODULE]
    assert kept_rank(4, 0.7) == 2 and kept_rank(8, 0.99) == 7 and kept_rank(1, 0.5) == 1
    assert tail_norm(factors, 0.7).item() == pytest.approx(dense(update, MODULE, slice(2, None)).norm().item(),
                                                           rel=1e-5)

    # differentiable, with the dense norm's gradient, and a zero (not NaN) gradient for a zero tail
    A, B = factors.A.double().requires_grad_(), factors.B.double().requires_grad_()
    tail_norm(LoraFactors(A, B, factors.scale), 0.7).backward()
    A_ref, B_ref = factors.A.double().requires_grad_(), factors.B.double().requires_grad_()
    (factors.scale * B_ref[:, 2:] @ A_ref[2:]).norm().backward()
    assert torch.allclose(A.grad, A_ref.grad) and torch.allclose(B.grad, B_ref.grad)
    fresh_B = torch.zeros(12, 4, dtype=torch.float64, requires_grad=True)
    tail_norm(LoraFactors(A.detach(), fresh_B, 1.0), 0.7).backward()
    assert torch.equal(fresh_B.grad, torch.zeros_like(fresh_B))

    aggregator = get_aggregator("hetlora", gamma=0.7, penalty=0.25)
    expected = 0.25 * sum(dense(update, module, slice(2, None)).norm().item() for module in SHAPES)
    # the term every client adds, as its plan carries it: a reference and options, no method
    regularizer = json.loads(json.dumps({"term": aggregator.regularizer().term,
                                         "options": aggregator.regularizer().options}))
    assert Regularizer(**regularizer)(update.factors).item() == pytest.approx(expected, rel=1e-5)


def test_hetlora_self_pruning_cuts_the_rank_when_the_tail_shrank_since_the_last_round():
    update = heterogeneous()[1]  # rank 4; γ = 0.9 keeps 3
    tail = sum(dense(update, module, slice(3, None)).norm().item() for module in SHAPES)
    rank, reported = self_pruned_rank(update.factors, 0.9, previous_tail=None)
    assert rank == 4 and reported == pytest.approx(tail, rel=1e-5)  # first round: nothing to compare with
    assert self_pruned_rank(update.factors, 0.9, previous_tail=tail * 1.01)[0] == 3
    assert self_pruned_rank(update.factors, 0.9, previous_tail=tail * 0.99)[0] == 4
    assert get_aggregator("hetlora", gamma=0.9).next_rank(update.factors, tail * 1.01) == self_pruned_rank(
        update.factors, 0.9, tail * 1.01)
    mixed = {MODULE: update.factors[MODULE], "other": LoraFactors(torch.randn(2, 10), torch.randn(8, 2))}
    with pytest.raises(ValueError, match="one rank"):
        self_pruned_rank(mixed, 0.9, None)


@pytest.mark.parametrize("options", [{"gamma": 1.0}, {"gamma": 0.0}, {"penalty": -1.0}, {"penalty": float("nan")}])
def test_hetlora_rejects_bad_options(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        get_aggregator("hetlora", **options)


# -- raFLoRA ----------------------------------------------------------------------------------

def partitioned(updates: list[ClientUpdate], module: str) -> torch.Tensor:
    """raFLoRA's definition: cut at the distinct ranks; each partition averaged over its holders."""
    bounds = sorted({update.factors[module].rank for update in updates})
    total = torch.zeros(SHAPES[module], dtype=torch.float64)
    for low, high in zip([0] + bounds, bounds):
        holders = [(update, p) for update, p in zip(updates, shares(updates)) if update.factors[module].rank >= high]
        mass = sum(p for _, p in holders)
        total += sum(p / mass * dense(update, module, slice(low, high)) for update, p in holders)
    return total


def test_raflora_weights_each_rank_partition_by_its_holders_then_allocates_by_svd():
    updates = heterogeneous()
    result = get_aggregator("raflora").aggregate(updates)
    assert not result.merge
    for module in SHAPES:
        reference = partitioned(updates, module)
        assert relative_error(result.delta(module), reference) <= 1e-5
        for update in updates:
            rank = min(update.factors[module].rank, *SHAPES[module])
            allocated = result.client_factors[update.client_id][module]
            assert allocated.rank == rank
            assert relative_error(allocated.delta(), svd_truncation(reference, rank)) <= 1e-5
        # the components above the smallest rank weigh more than in Σ p_k ΔW_k
        assert relative_error(result.delta(module), ideal(updates, module)) > 1e-2


def test_raflora_with_one_rank_is_the_exact_average_and_flexlora():
    """At one rank raFLoRA is FlexLoRA, global update and client starts alike (the quality sweep
    runs it in the heterogeneous setting only)."""
    updates = homogeneous()
    result = get_aggregator("raflora").aggregate(updates)
    flexlora = get_aggregator("flexlora").aggregate(updates)
    for module in SHAPES:
        assert relative_error(result.delta(module), ideal(updates, module)) <= 1e-5
        assert torch.equal(result.delta(module), flexlora.delta(module))
    starts = [get_aggregator(name).client_start(update, "c0", 4) for name, update in
              (("raflora", result), ("flexlora", flexlora))]
    for module in SHAPES:
        assert torch.equal(starts[0][module].A, starts[1][module].A)
        assert torch.equal(starts[0][module].B, starts[1][module].B)


def test_raflora_keeps_an_unchanged_allocation_where_flexlora_shrinks_it():
    """The paper's rank collapse: clients hand back the SVD allocation they got, untrained."""
    generator = torch.Generator().manual_seed(7)
    U, _ = torch.linalg.qr(torch.randn(12, 6, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(10, 6, generator=generator, dtype=torch.float64))
    S = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    updates = [ClientUpdate({"m": LoraFactors(V[:, :r].T.float(), (U[:, :r] * S[:r]).float())}, n, cid)
               for cid, r, n in (("wide", 6, 3), ("narrow", 2, 7))]
    global_update = U * S @ V.T
    shared = U[:, :2] * S[:2] @ V[:, :2].T
    raflora = get_aggregator("raflora").aggregate(updates).delta("m", torch.float64)
    flexlora = get_aggregator("flexlora").aggregate(updates).delta("m", torch.float64)
    assert relative_error(raflora, global_update) <= 1e-5
    # FlexLoRA: the components beyond the shared rank 2 are scaled by their holders' share, 0.3
    assert relative_error(flexlora, shared + 0.3 * (global_update - shared)) <= 1e-5


# -- bad inputs with mixed ranks (the suite's corruption tests cover every method at one rank) --

@pytest.mark.parametrize("name", ["florist", "hetlora", "raflora"])
def test_mixed_rank_methods_name_the_client_and_module_of_a_corrupt_update(name):
    updates = heterogeneous()
    updates[1].factors[MODULE].B[0, 0] = float("nan")
    with pytest.raises(AggregationError) as error:
        get_aggregator(name).aggregate(updates)
    assert str(error.value).startswith(f"client 'rs', module {MODULE!r}: B contains NaN")


@pytest.mark.parametrize("name", ["fedsa", "lorafair"])
def test_one_rank_methods_refuse_mixed_ranks_naming_client_and_module(name):
    with pytest.raises(AggregationError) as error:
        get_aggregator(name).aggregate(heterogeneous())
    assert error.value.rule == "heterogeneous" and error.value.client_id == "rs" and error.value.module == MODULE
    assert "\n" not in str(error.value)
