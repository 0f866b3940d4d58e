"""FedSVD, FLoRA-NA and FedMomentum against float64 dense computations of their definitions, and on the engine.

Each method runs three rounds through setup / plan / aggregate / commit on random clients of
unequal size, every client starting from the plan it is given; the references are built here
from the raw tensors in float64 (dense matrices, torch.linalg.svd), without library code. The
engine tests run tiny-llama in-process and check what the ledger counts; the same runs over
Flower are in test_methods_on_flower.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora.aggregation import AggregationError, ClientPlan, ClientUpdate, LoraFactors, RunContext, get_aggregator
from fedlora.engine.config import save_config
from fedlora.engine.metrics import read_metrics
from fedlora.engine.setup import prepare_run
from fedlora.runtime.inprocess import run_inprocess

import support

SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.self_attn.v_proj": (8, 10)}
EXAMPLES = {"c0": 5, "c1": 17, "c2": 9}
RANK, SCALE = 3, 8 / 3
ROUNDS = (1, 2, 3)


def set_up(name: str, **options):
    method = get_aggregator(name, **options)
    method.setup(RunContext(ranks=dict.fromkeys(EXAMPLES, RANK), scales=dict.fromkeys(EXAMPLES, SCALE),
                            shapes=SHAPES, seed=5))
    return method


def trained(client_id: str, plan: ClientPlan, generator: torch.Generator) -> ClientUpdate:
    """The client's LoRA as the trainer starts it from ``plan`` (fresh: A random, B zero; else
    the start at the client's scale), then random steps on the factors it trains."""
    factors = {}
    for module, (d, n) in SHAPES.items():
        if plan.start is None:
            A, B = torch.randn(plan.rank, n, generator=generator), torch.zeros(d, plan.rank)
        else:
            start = plan.start[module]
            A, B = start.A.clone(), start.B * (start.scale / SCALE)
        if "A" in plan.trainable:
            A = A + 0.3 * torch.randn(A.shape, generator=generator)
        if "B" in plan.trainable:
            B = B + 0.3 * torch.randn(B.shape, generator=generator)
        factors[module] = LoraFactors(A, B, SCALE)
    return ClientUpdate(factors, EXAMPLES[client_id], client_id)


def dense(factors: LoraFactors | None) -> torch.Tensor | float:
    return 0.0 if factors is None else factors.scale * factors.B.double() @ factors.A.double()


def shares() -> list[float]:
    return [count / sum(EXAMPLES.values()) for count in EXAMPLES.values()]


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


def round_of(method, server_round: int, generator: torch.Generator):
    """Every client's plan and upload for ``server_round``, and the round's aggregate."""
    plans = {cid: method.plan(cid, server_round) for cid in EXAMPLES}
    updates = [trained(cid, plan, generator) for cid, plan in plans.items()]
    return plans, updates, method.aggregate(updates, server_round=server_round)


# -- FedSVD -----------------------------------------------------------------------------------

@pytest.mark.parametrize("period", [1, 2])
def test_fedsvd_averages_B_on_the_shared_A_and_refactors_the_product_into_an_orthonormal_A(period):
    method, generator = set_up("fedsvd", period=period), torch.Generator().manual_seed(1)
    for server_round in ROUNDS:
        plans, updates, update = round_of(method, server_round, generator)
        for cid, plan in plans.items():  # clients train and send B only, from the server's pair
            assert plan.trainable == plan.uploads == {"B"} and plan.rank == RANK, cid
        for module in SHAPES:
            starts = [plan.start[module] for plan in plans.values()]
            A_t = starts[0].A
            assert all(torch.equal(start.A, A_t) and torch.equal(start.B, starts[0].B) for start in starts)
            if server_round == 1:  # drawn from the run's seed, as FFA-LoRA's, B zero
                assert A_t.any() and not starts[0].B.any()
            elif (server_round - 1) % period == 0:  # the pair the last SVD made: A's rows orthonormal
                torch.testing.assert_close(A_t @ A_t.T, torch.eye(RANK), rtol=0, atol=1e-6)
            B_mean = sum(p * u.factors[module].B.double() for p, u in zip(shares(), updates))
            got = update.factors[module]
            assert not update.merge and not update.residual and got.scale == SCALE and got.rank == RANK
            assert relative(dense(got), SCALE * B_mean @ A_t.double()) < 1e-6  # exact: s·B̄·A_t
            if server_round % period:  # no SVD this round: FFA-LoRA's average on the same A
                assert torch.equal(got.A, A_t) and relative(got.B.double(), B_mean) < 1e-6
                continue
            U, S, Vh = torch.linalg.svd(B_mean @ A_t.double(), full_matrices=False)  # of B̄·A_t, s apart
            signs = (got.A.double() * Vh[:RANK]).sum(dim=1).sign()  # each component up to its sign
            torch.testing.assert_close(got.A.double() * signs[:, None], Vh[:RANK], rtol=0, atol=1e-5)
            torch.testing.assert_close(got.B.double() * signs, U[:, :RANK] * S[:RANK], rtol=1e-5, atol=1e-5)
        method.commit(server_round, update)


def test_fedsvd_keeps_the_rank_where_it_exceeds_a_side_of_the_module():
    """d = 3 < r = 4: the SVD has three components; A's fourth row is drawn, B's column zero."""
    generator = torch.Generator().manual_seed(2)
    A = torch.randn(4, 10, generator=generator)
    updates = [ClientUpdate({"m": LoraFactors(A, torch.randn(3, 4, generator=generator), 0.5)}, count, cid)
               for cid, count in (("a", 3), ("b", 5))]
    got = get_aggregator("fedsvd").aggregate(updates).factors["m"]
    B_mean = sum(count / 8 * u.factors["m"].B.double() for count, u in zip((3, 5), updates))
    assert got.rank == 4 and not got.B[:, 3].any() and got.A[3].any()
    assert relative(dense(got), 0.5 * B_mean @ A.double()) < 1e-6
    torch.testing.assert_close(got.A[:3] @ got.A[:3].T, torch.eye(3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("period", [0, -1, 1.5, True])
def test_fedsvd_rejects_a_bad_period(period):
    with pytest.raises(ValueError, match="period"):
        get_aggregator("fedsvd", period=period)


def test_fedsvd_with_a_period_needs_the_round():
    updates = [ClientUpdate({"m": LoraFactors(torch.ones(2, 5), torch.ones(4, 2), 1.0)}, 1, "a")]
    with pytest.raises(AggregationError, match="server_round"):
        get_aggregator("fedsvd", period=2).aggregate(updates)


# -- FLoRA-NA ---------------------------------------------------------------------------------

def test_florana_sends_the_best_rank_r_pair_of_the_exact_sum_and_clients_continue_from_it():
    method, generator = set_up("florana"), torch.Generator().manual_seed(3)
    fedit = get_aggregator("fedit")
    for server_round in ROUNDS:
        plans, updates, update = round_of(method, server_round, generator)
        for cid, plan in plans.items():  # both factors trained and sent, as FedIT's
            assert plan.trainable == plan.uploads == {"A", "B"} and plan.rank == RANK, cid
            assert (plan.start is None) == (server_round == 1)  # round 1: fresh LoRAs of their own
            if plan.start is not None:
                assert plan.start is method.global_update.factors
        assert not update.merge and not update.residual
        average, tails = fedit.aggregate(updates), []
        for module in SHAPES:
            target = sum(p * dense(u.factors[module]) for p, u in zip(shares(), updates))
            U, S, Vh = torch.linalg.svd(target, full_matrices=False)
            got = update.factors[module]
            assert got.rank == RANK
            assert relative(dense(got), U[:, :RANK] * S[:RANK] @ Vh[:RANK]) < 1e-5  # Eckart–Young
            tails.append((S[RANK:].square().sum() / S.square().sum()).sqrt().item())
            # the closest rank-r pair: closer than FedIT's average of the same uploads
            assert relative(dense(got), target) < relative(average.delta(module, torch.float64), target)
        assert update.info["truncation_error"] == pytest.approx(max(tails), rel=1e-5)
        assert update.info["truncation_error"] > 1e-2  # three clients' sum has rank > r
        method.commit(server_round, update)


# -- FedMomentum ------------------------------------------------------------------------------

def test_fedmomentum_keeps_the_leading_rank_r_part_merges_the_rest_and_is_exact():
    """W_{t+1} + G_{t+1} = W_t + G_t + Σ p_k (ΔW_k − G_t): every round, in float64."""
    method, warm, generator = set_up("fedmomentum"), set_up("flora-warm"), torch.Generator().manual_seed(4)
    base = {module: torch.zeros(d, n, dtype=torch.float64) for module, (d, n) in SHAPES.items()}
    for server_round in ROUNDS:
        plans, updates, update = round_of(method, server_round, generator)
        for cid, plan in plans.items():
            assert plan.trainable == plan.uploads == {"A", "B"} and plan.rank == RANK, cid
            assert (plan.start is None) == (server_round == 1)
        for module in SHAPES:
            adapter = method.global_update.factors[module] if method.global_update else None
            change = sum(p * (dense(u.factors[module]) - dense(adapter)) for p, u in zip(shares(), updates))
            before = base[module] + dense(adapter)
            base[module] = base[module] + dense(update.residual[module])
            got = update.factors[module]
            assert got.rank == RANK and update.residual[module].rank > 0
            assert relative(base[module] + dense(got) - before, change) < 1e-6
            # the adapter: the leading r part of S = Σ p_k s B_k A_k (clients started from G_t)
            U, S, Vh = torch.linalg.svd(sum(p * dense(u.factors[module]) for p, u in zip(shares(), updates)))
            assert relative(dense(got), U[:, :RANK] * S[:RANK] @ Vh[:RANK]) < 1e-6
        # at one rank flora-warm's update, bit for bit
        same = warm.aggregate(updates, server_round=server_round)
        assert update.info == same.info
        for part in ("factors", "residual"):
            for module, factors in getattr(update, part).items():
                theirs = getattr(same, part)[module]
                assert torch.equal(factors.A, theirs.A) and torch.equal(factors.B, theirs.B), (part, module)
        method.commit(server_round, update)
        warm.commit(server_round, same)


# -- all three ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fedsvd", "florana", "fedmomentum"])
def test_one_rank_methods_refuse_mixed_ranks_naming_client_and_module(name):
    generator = torch.Generator().manual_seed(6)
    A = torch.randn(3, 10, generator=generator)
    updates = [ClientUpdate({"m": LoraFactors(A[:rank], torch.randn(12, rank, generator=generator), 1.0)}, 4, cid)
               for cid, rank in (("c0", 3), ("c1", 2))]
    method = get_aggregator(name)
    assert not method.heterogeneous_ranks and not method.client_dp and not method.personalised
    with pytest.raises(AggregationError) as error:
        method.aggregate(updates)
    assert (error.value.rule, error.value.client_id, error.value.module) == ("heterogeneous", "c1", "m")
    assert str(error.value).startswith(f"client 'c1', module 'm': {name} needs one rank")
    assert "\n" not in str(error.value)


# -- the engine on tiny-llama -------------------------------------------------------------------

def run(client_dir: Path, out: Path, method: str):
    """Two rounds of three clients at rank 2, two a round (so that one misses a round)."""
    config = support.tiny_config(client_dir, out, method=method, ranks=[2], rounds=2, clients_per_round=2)
    out.mkdir(parents=True)
    save_config(config, out / "config.json")
    setup = prepare_run(config, out, log=lambda message: None)
    run_inprocess(setup)
    return setup.federation, read_metrics(out)


@pytest.mark.parametrize("method", ["fedsvd", "florana", "fedmomentum"])
def test_each_runs_on_tiny_llama_and_the_ledger_counts_what_travels(client_dir, tmp_path, method):
    federation, rows = run(client_dir, tmp_path / method, method)
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert not any(row["rejected"] or row["skipped"] for row in rows[1:])
    assert rows[2]["eval_loss"] != rows[0]["eval_loss"]
    A_params = sum(2 * n for d, n in federation.shapes.values())
    B_params = sum(d * 2 for d, n in federation.shapes.values())
    sent = {"fedsvd": B_params, "florana": A_params + B_params, "fedmomentum": A_params + B_params}[method]
    # round 1: FedSVD's clients download the A drawn from the seed (and B = 0), the others start fresh
    received = {"fedsvd": [A_params + B_params] * 2, "florana": [0, A_params + B_params],
                "fedmomentum": [0, A_params + B_params + federation.ledger.merges.get(1, 0)]}[method]
    for row, down in zip(rows[1:], received):
        clients = len(row["clients"])
        assert row["params_up"] == clients * sent and row["bytes_up"] == 4 * row["params_up"]
        assert row["params_down"] == clients * down and row["bytes_down"] == 4 * row["params_down"]
    if method in ("fedsvd", "fedmomentum"):  # exact, as the float64 references above show
        assert all(row["aggregation_error"] < 1e-5 for row in rows[1:])
    if method == "fedmomentum":
        assert set(federation.ledger.merges) == {1, 2}  # each round merged its residual
    if method == "fedsvd":  # the next round's clients share the re-factored A, orthonormal
        starts = [task.plan.start for task in federation.configure_train(3)]
        for module, factors in federation.method.global_update.factors.items():
            assert all(torch.equal(start[module].A, factors.A) for start in starts)
            torch.testing.assert_close(factors.A @ factors.A.T, torch.eye(2), rtol=0, atol=1e-5)
