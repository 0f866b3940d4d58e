"""FedSA-LoRA, LoRA-FAIR, FLoRIST, HetLoRA and raFLoRA against float64 dense computations of their definitions.

Each reference is built here from the raw tensors, α and rank, in float64, without library
code: dense matrices, torch.linalg.svd / pinv. Where a method is not Σ p_k ΔW_k, the test
shows by how much it is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from fedlora.aggregation import AggregationError, ClientUpdate, LoraFactors, get_aggregator
from fedlora.aggregation.hetlora import kept_rank, self_pruned_rank, tail_norm

SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.self_attn.v_proj": (8, 10)}
MODULE = next(iter(SHAPES))


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


def to_updates(clients: list[Client], tensors: list[dict]) -> list[ClientUpdate]:
    return [ClientUpdate({module: LoraFactors(A=A, B=B, scale=client.scale) for module, (A, B) in raw.items()},
                         client.num_examples, client.client_id)
            for client, raw in zip(clients, tensors)]


def shares(clients: list[Client]) -> list[float]:
    total = sum(client.num_examples for client in clients)
    return [client.num_examples / total for client in clients]


def dense(client: Client, raw: dict, module: str, columns: slice = slice(None)) -> torch.Tensor:
    """s_k B_k A_k in float64, optionally of a range of rank components only."""
    A, B = raw[module]
    return client.scale * (B.double()[:, columns] @ A.double()[columns])


def ideal(clients: list[Client], tensors: list[dict], module: str) -> torch.Tensor:
    """Σ p_k s_k B_k A_k with example shares."""
    return sum(p * dense(client, raw, module) for client, raw, p in zip(clients, tensors, shares(clients)))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def svd_truncation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :rank] * S[:rank] @ Vh[:rank]


def padded(tensor: torch.Tensor, rank: int, rank_dim: int) -> torch.Tensor:
    pad = [0, 0, 0, rank - tensor.shape[0]] if rank_dim == 0 else [0, rank - tensor.shape[1]]
    return torch.nn.functional.pad(tensor.double(), pad)


# -- FedSA-LoRA -----------------------------------------------------------------------------

def test_fedsa_averages_only_A_and_each_client_keeps_its_own_B():
    tensors = [client.tensors() for client in HOMOGENEOUS]
    aggregator = get_aggregator("fedsa")
    assert aggregator.uploaded == {"A"} and aggregator.kept_on_client == {"B"}
    assert aggregator.trainable(1) == {"A", "B"}  # both are trained, only A travels
    result = aggregator.aggregate(to_updates(HOMOGENEOUS, tensors))
    assert not result.merge
    for module in SHAPES:
        A_mean = sum(p * raw[module][0].double() for raw, p in zip(tensors, shares(HOMOGENEOUS)))
        for client, raw in zip(HOMOGENEOUS, tensors):
            personal = result.client_factors[client.client_id][module]
            assert relative_error(personal.A, A_mean) <= 1e-6
            assert torch.equal(personal.B, raw[module][1]) and personal.scale == client.scale
            # the personalised model is not the client's own update: its A is the average
            assert relative_error(personal.delta(), dense(client, raw, module)) > 1e-2
        # the single model a one-global-model runtime would show is FedIT's, not Σ p_k ΔW_k
        assert relative_error(result.factors[module].A, A_mean) <= 1e-6
        assert relative_error(result.delta(module), ideal(HOMOGENEOUS, tensors, module)) > 1e-2


def test_fedsa_client_starts_from_the_global_A_and_the_B_of_its_last_round():
    aggregator = get_aggregator("fedsa")
    first = [client.tensors() for client in HOMOGENEOUS]
    aggregator.aggregate(to_updates(HOMOGENEOUS, first))
    later = [Client(c.client_id, c.rank, c.alpha, c.num_examples, c.rslora, seed=c.seed + 100) for c in HOMOGENEOUS]
    second = aggregator.aggregate(to_updates(later[:2], [client.tensors() for client in later[:2]]))
    absent = aggregator.client_start(second, "c2", 4)       # not sampled in round 2
    newcomer = aggregator.client_start(second, "newcomer", 4)
    for module in SHAPES:
        assert torch.equal(absent[module].A, second.factors[module].A)
        assert torch.equal(absent[module].B, first[2][module][1])
        assert torch.equal(newcomer[module].A, second.factors[module].A) and not newcomer[module].B.any()

    restored = get_aggregator("fedsa")
    restored.load_state_dict(aggregator.state_dict())
    for cid in ("c0", "c1", "c2"):
        for module, factors in restored.client_start(second, cid, 4).items():
            assert torch.equal(factors.B, aggregator.client_start(second, cid, 4)[module].B)


def test_fedsa_rejects_duplicate_client_ids():
    updates = to_updates(HOMOGENEOUS[:2], [client.tensors() for client in HOMOGENEOUS[:2]])
    updates[1].client_id = updates[0].client_id
    with pytest.raises(AggregationError, match="more than one update"):
        get_aggregator("fedsa").aggregate(updates)


# -- LoRA-FAIR -------------------------------------------------------------------------------

def fedit_means(clients: list[Client], tensors: list[dict], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    p = shares(clients)
    return (sum(w * raw[module][0].double() for raw, w in zip(tensors, p)),
            sum(w * raw[module][1].double() for raw, w in zip(tensors, p)))


@pytest.mark.parametrize("ridge", [0.0, 0.5])
def test_lorafair_correction_is_the_regularised_least_squares_optimum(ridge):
    clients, tensors = HOMOGENEOUS, [client.tensors() for client in HOMOGENEOUS]
    aggregator = get_aggregator("lorafair", ridge=ridge)
    result = aggregator.aggregate(to_updates(clients, tensors))
    fedit = get_aggregator("fedit").aggregate(to_updates(clients, tensors))
    assert not result.merge
    s, worst_fedit, worst = clients[0].scale, 0.0, 0.0
    for module in SHAPES:
        target = ideal(clients, tensors, module)
        A_mean, B_mean = fedit_means(clients, tensors, module)
        # minimise ‖T − s(B̄ + ΔB)Ā‖² + ridge‖sΔB‖²: s·ΔB = (T − sB̄Ā)Āᵀ(ĀĀᵀ + ridge·I)⁻¹
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
    client = HOMOGENEOUS[0]
    raw = client.tensors()
    result = get_aggregator("lorafair").aggregate(to_updates([client], [raw]))
    assert result.info["residual_error"] <= 1e-6
    for module in SHAPES:
        assert relative_error(result.delta(module), dense(client, raw, module)) <= 1e-6

    # Ā with dependent rows (and float32 round-off in the dependence): the minimum-norm ΔB, not a blow-up
    A = torch.randn(2, 10, dtype=torch.float64)
    A = torch.cat([A, A[:1] + A[1:]]).float().double()      # rank 2 up to float32 rounding, three rows
    E, B1, B2 = torch.randn(3, 10, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64), \
        torch.randn(12, 3, dtype=torch.float64)
    pair = [ClientUpdate({"m": LoraFactors((A + sign * E).float(), B.float(), 2.0)}, 1, f"t{k}")
            for k, (sign, B) in enumerate(((1, B1), (-1, B2)))]
    got = get_aggregator("lorafair").aggregate(pair).factors["m"]
    A_mean, B_mean = sum(f.factors["m"].A.double() for f in pair) / 2, (B1.float().double() + B2.float().double()) / 2
    target = sum(2.0 * f.factors["m"].B.double() @ f.factors["m"].A.double() for f in pair) / 2
    expected = B_mean + (target / 2.0 - B_mean @ A_mean) @ torch.linalg.pinv(A_mean, rtol=1e-5)
    assert torch.linalg.matrix_rank(A_mean, rtol=1e-5) == 2
    assert relative_error(got.B, expected) <= 1e-5


@pytest.mark.parametrize("ridge", [-1.0, float("nan"), float("inf")])
def test_lorafair_rejects_a_bad_ridge(ridge):
    with pytest.raises(ValueError, match="ridge"):
        get_aggregator("lorafair", ridge=ridge)


# -- FLoRIST ----------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99, 1.0])
def test_florist_keeps_the_fewest_singular_values_reaching_the_energy_threshold(threshold):
    tensors = [client.tensors() for client in HETEROGENEOUS]
    result = get_aggregator("florist", threshold=threshold).aggregate(to_updates(HETEROGENEOUS, tensors))
    assert result.merge  # one global pair, merged; clients start fresh LoRAs of their own ranks
    tails, ranks = [], []
    for module in SHAPES:
        target = ideal(HETEROGENEOUS, tensors, module)
        S = torch.linalg.svdvals(target)
        energy = S.square() / S.square().sum()
        rank = next(k for k in range(1, S.numel() + 1) if energy[:k].sum() >= threshold - 1e-12)
        factors = result.factors[module]
        assert factors.rank == rank
        assert relative_error(result.delta(module), svd_truncation(target, rank)) <= 1e-5
        tail = energy[rank:].sum().sqrt().item()
        assert relative_error(result.delta(module), target) == pytest.approx(tail, abs=1e-5)
        assert tail <= math.sqrt(1 - threshold) + 1e-6
        tails.append(tail)
        ranks.append(rank)
    assert result.info["broadcast_rank"] == max(ranks)
    assert result.info["truncation_error"] == pytest.approx(max(tails), abs=1e-6)
    if threshold == 1.0:  # everything kept: exact, at the numerical rank min(d, n, Σr)
        assert ranks == [min(*SHAPES[m], sum(c.rank for c in HETEROGENEOUS)) for m in SHAPES]
    else:
        assert min(tails) > 0  # the truncation the threshold buys


def test_florist_accumulator_and_shuffle_give_the_aggregate():
    updates = to_updates(HETEROGENEOUS, [client.tensors() for client in HETEROGENEOUS])
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

def norm_weighted_average(clients: list[Client], tensors: list[dict], module: str,
                          given: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """HetLoRA's definition: zero-pad, weight by given_k·‖s_k B_k A_k‖_F (normalised), average; s_k into B."""
    top = max(client.rank for client in clients)
    norms = [g * dense(client, raw, module).norm().item() for client, raw, g in zip(clients, tensors, given)]
    weights = [n / sum(norms) for n in norms]
    A = sum(w * padded(raw[module][0], top, 0) for raw, w in zip(tensors, weights))
    B = sum(w * client.scale * padded(raw[module][1], top, 1) for client, raw, w in zip(clients, tensors, weights))
    return A, B


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_hetlora_weights_clients_by_their_update_norms(weights):
    tensors = [client.tensors() for client in HETEROGENEOUS]
    result = get_aggregator("hetlora").aggregate(to_updates(HETEROGENEOUS, tensors), weights)
    zeropad = get_aggregator("zeropad").aggregate(to_updates(HETEROGENEOUS, tensors))
    assert not result.merge
    for module in SHAPES:
        A, B = norm_weighted_average(HETEROGENEOUS, tensors, module, weights or [1.0] * 3)
        factors = result.factors[module]
        assert factors.scale == 1.0 and factors.rank == 16
        assert relative_error(factors.A, A) <= 1e-6 and relative_error(factors.B, B) <= 1e-6
        # not the example-share average, and FedIT's cross terms remain
        assert relative_error(factors.A, zeropad.factors[module].A.double()) > 1e-2
        assert relative_error(result.delta(module), ideal(HETEROGENEOUS, tensors, module)) > 1e-2


def test_hetlora_distributes_by_truncation_and_falls_back_to_uniform_for_zero_updates():
    tensors = [client.tensors() for client in HETEROGENEOUS]
    aggregator = get_aggregator("hetlora")
    result = aggregator.aggregate(to_updates(HETEROGENEOUS, tensors))
    start = aggregator.client_start(result, "small", 2)
    for module, factors in start.items():
        assert torch.equal(factors.A, result.factors[module].A[:2])
        assert torch.equal(factors.B, result.factors[module].B[:, :2])
    silent = [{module: (A, torch.zeros_like(B)) for module, (A, B) in raw.items()} for raw in tensors]
    uniform = aggregator.aggregate(to_updates(HETEROGENEOUS, silent))
    for module in SHAPES:
        expected = sum(padded(raw[module][0], 16, 0) for raw in tensors) / 3
        assert relative_error(uniform.factors[module].A, expected) <= 1e-6


def test_hetlora_tail_norm_is_the_dense_norm_of_the_components_pruning_drops():
    client = HETEROGENEOUS[1]  # rank 4
    raw = client.tensors()
    factors = LoraFactors(*raw[MODULE], scale=client.scale)
    assert kept_rank(4, 0.7) == 2 and kept_rank(8, 0.99) == 7 and kept_rank(1, 0.5) == 1
    assert tail_norm(factors, 0.7).item() == pytest.approx(dense(client, raw, MODULE, slice(2, None)).norm().item(),
                                                           rel=1e-5)

    # differentiable, with the dense norm's gradient, and a zero (not NaN) gradient for a zero tail
    A = raw[MODULE][0].double().requires_grad_()
    B = raw[MODULE][1].double().requires_grad_()
    tail_norm(LoraFactors(A, B, client.scale), 0.7).backward()
    A_ref = raw[MODULE][0].double().requires_grad_()
    B_ref = raw[MODULE][1].double().requires_grad_()
    (client.scale * B_ref[:, 2:] @ A_ref[2:]).norm().backward()
    assert torch.allclose(A.grad, A_ref.grad) and torch.allclose(B.grad, B_ref.grad)
    fresh_B = torch.zeros(12, 4, dtype=torch.float64, requires_grad=True)
    tail_norm(LoraFactors(A.detach(), fresh_B, 1.0), 0.7).backward()
    assert torch.equal(fresh_B.grad, torch.zeros_like(fresh_B))

    aggregator = get_aggregator("hetlora", gamma=0.7, penalty=0.25)
    both = {module: LoraFactors(A_, B_, client.scale) for module, (A_, B_) in raw.items()}
    expected = 0.25 * sum(dense(client, raw, module, slice(2, None)).norm().item() for module in SHAPES)
    assert aggregator.regularizer(both).item() == pytest.approx(expected, rel=1e-5)


def test_hetlora_self_pruning_cuts_the_rank_when_the_tail_shrank_since_the_last_round():
    client = HETEROGENEOUS[1]
    raw = client.tensors()
    factors = {module: LoraFactors(A, B, client.scale) for module, (A, B) in raw.items()}
    tail = sum(dense(client, raw, module, slice(3, None)).norm().item() for module in SHAPES)  # γ=0.9: keep 3
    rank, reported = self_pruned_rank(factors, 0.9, previous_tail=None)
    assert rank == 4 and reported == pytest.approx(tail, rel=1e-5)  # first round: nothing to compare with
    assert self_pruned_rank(factors, 0.9, previous_tail=tail * 1.01)[0] == 3
    assert self_pruned_rank(factors, 0.9, previous_tail=tail * 0.99)[0] == 4
    assert get_aggregator("hetlora", gamma=0.9).next_rank(factors, tail * 1.01) == self_pruned_rank(
        factors, 0.9, tail * 1.01)
    mixed = {MODULE: factors[MODULE], "other": LoraFactors(torch.randn(2, 10), torch.randn(8, 2))}
    with pytest.raises(ValueError, match="one rank"):
        self_pruned_rank(mixed, 0.9, None)


@pytest.mark.parametrize("options", [{"gamma": 1.0}, {"gamma": 0.0}, {"penalty": -1.0}, {"penalty": float("nan")}])
def test_hetlora_rejects_bad_options(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        get_aggregator("hetlora", **options)


# -- raFLoRA ----------------------------------------------------------------------------------

def partitioned(clients: list[Client], tensors: list[dict], module: str, p: list[float]) -> torch.Tensor:
    """raFLoRA's definition: cut at the distinct ranks; each partition averaged over its holders."""
    bounds = sorted({client.rank for client in clients})
    total = torch.zeros(SHAPES[module], dtype=torch.float64)
    for low, high in zip([0] + bounds, bounds):
        holders = [(client, raw, w) for client, raw, w in zip(clients, tensors, p) if client.rank >= high]
        mass = sum(w for _, _, w in holders)
        total += sum(w / mass * dense(client, raw, module, slice(low, high)) for client, raw, w in holders)
    return total


def test_raflora_weights_each_rank_partition_by_its_holders_then_allocates_by_svd():
    tensors = [client.tensors() for client in HETEROGENEOUS]
    result = get_aggregator("raflora").aggregate(to_updates(HETEROGENEOUS, tensors))
    assert not result.merge
    for module in SHAPES:
        reference = partitioned(HETEROGENEOUS, tensors, module, shares(HETEROGENEOUS))
        assert relative_error(result.delta(module), reference) <= 1e-5
        for client in HETEROGENEOUS:
            rank = min(client.rank, min(SHAPES[module]))
            allocated = result.client_factors[client.client_id][module]
            assert allocated.rank == rank
            assert relative_error(allocated.delta(), svd_truncation(reference, rank)) <= 1e-5
        # the components above the smallest rank weigh more than in Σ p_k ΔW_k
        assert relative_error(result.delta(module), ideal(HETEROGENEOUS, tensors, module)) > 1e-2


def test_raflora_with_one_rank_is_the_exact_average():
    tensors = [client.tensors() for client in HOMOGENEOUS]
    result = get_aggregator("raflora").aggregate(to_updates(HOMOGENEOUS, tensors))
    for module in SHAPES:
        assert relative_error(result.delta(module), ideal(HOMOGENEOUS, tensors, module)) <= 1e-5


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
    updates = to_updates(HETEROGENEOUS, [client.tensors() for client in HETEROGENEOUS])
    updates[1].factors[MODULE].B[0, 0] = float("nan")
    with pytest.raises(AggregationError) as error:
        get_aggregator(name).aggregate(updates)
    assert str(error.value).startswith(f"client 'rs', module {MODULE!r}: B contains NaN")


@pytest.mark.parametrize("name", ["fedsa", "lorafair"])
def test_one_rank_methods_refuse_mixed_ranks_naming_client_and_module(name):
    updates = to_updates(HETEROGENEOUS, [client.tensors() for client in HETEROGENEOUS])
    with pytest.raises(AggregationError) as error:
        get_aggregator(name).aggregate(updates)
    assert error.value.rule == "heterogeneous" and error.value.client_id == "rs" and error.value.module == MODULE
    assert "\n" not in str(error.value)
