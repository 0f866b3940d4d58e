"""Every round's aggregation and broadcast error against a dense float64 computation.

The engine computes both from factors (aggregation/error.py); here they are recomputed from
dense matrices: the global model's weights before and after a round (the model in float64, so
merging adds no rounding of its own) and every client's dense change, for every registered
method on random clients of unequal size and, where the method allows, unequal ranks.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedlora.aggregation import ClientUpdate, LoraFactors, available_aggregators, aggregator_class
from fedlora.aggregation.error import FactoredSum, relative_error
from fedlora.engine.setup import prepare_run
from fedlora.engine.task import ClientResult, ClientTask
from fedlora.lora.merge import base_weight

from support import tiny_config

#: methods whose global model changes by exactly Σ p_k Δ_k (up to float32 rounding of the factors)
EXACT = ("flora", "flora-warm", "flora-adalora", "fedex", "ffa", "rolora", "fedsvd", "fedmomentum", "ravan",
         "centralized")
#: methods whose clients keep models of their own: no global model to compare
PERSONALISED = ("fedsa", "local")


def dense(factors: dict[str, LoraFactors] | None, module: str) -> torch.Tensor | float:
    if not factors or module not in factors:
        return 0.0
    f = factors[module]
    B = f.B.double() @ torch.block_diag(*f.H.double()) if f.H is not None else f.B.double()
    return f.scale * B @ f.A.double()


def squared(matrix: torch.Tensor | float) -> float:
    """‖matrix‖_F² (0 for the scalar 0 that stands for no update)."""
    return float(torch.linalg.matrix_norm(matrix) ** 2) if isinstance(matrix, torch.Tensor) else 0.0


def random_factors(rank: int, d: int, n: int, generator: torch.Generator) -> LoraFactors:
    return LoraFactors(torch.randn(rank, n, generator=generator), torch.randn(d, rank, generator=generator), 0.7)


def test_relative_error_matches_dense_and_merges_shared_terms():
    generator = torch.Generator().manual_seed(0)
    shared = {"m": random_factors(3, 7, 5, generator), "k": random_factors(2, 4, 6, generator)}
    clients = [{"m": random_factors(r, 7, 5, generator), "k": random_factors(r + 1, 4, 6, generator)}
               for r in (1, 2, 4)]
    weights = [0.2, 0.3, 0.5]
    target = FactoredSum()
    for weight, factors in zip(weights, clients):
        target.add(factors, weight).add(shared, -weight)
    mean = {m: LoraFactors(sum(w * c[m].A[:1] for w, c in zip(weights, clients)),
                           sum(w * c[m].B[:, :1] for w, c in zip(weights, clients)), 1.3) for m in shared}
    actual = FactoredSum().add(mean).add(shared, -1.0)
    error = sum(squared(dense(mean, m) - dense(shared, m)
                        - sum(w * (dense(c, m) - dense(shared, m)) for w, c in zip(weights, clients))) for m in shared)
    norm = sum(squared(sum(w * (dense(c, m) - dense(shared, m)) for w, c in zip(weights, clients))) for m in shared)
    assert relative_error(actual, target) == pytest.approx(math.sqrt(error / norm), rel=1e-10)
    # the shared start enters both sums as one block whose coefficients cancel: Σ w = 1
    assert len(target.terms["m"]) == 4
    assert relative_error(target, target) == 0.0
    assert relative_error(FactoredSum(), FactoredSum()) == 0.0
    assert relative_error(actual, FactoredSum()) is None


def synthetic_result(task: ClientTask, shapes: dict, scale: float, size: int, generator: torch.Generator) -> ClientResult:
    """A client's update as training could leave it: its LoRA as the trainer starts it (the
    start's components leading, the rest fresh with B zero), then random steps on the
    factors it trains."""
    factors = {}
    for module, (d, n) in shapes.items():
        start = task.plan.start[module] if task.plan.start is not None else None
        if start is not None and start.H is not None:  # a core trained between frozen heads (RAVAN)
            H = start.H * (start.scale / scale) + 0.3 * torch.randn(start.H.shape, generator=generator)
            factors[module] = LoraFactors(start.A, start.B, scale, H)
            continue
        A = (torch.rand(task.plan.rank, n, generator=generator) * 2 - 1) / math.sqrt(n)
        B = torch.zeros(d, task.plan.rank)
        if task.plan.start is not None:
            start = task.plan.start[module]
            A[:start.rank], B[:, :start.rank] = start.A, start.B * (start.scale / scale)
        if "A" in task.plan.trainable:
            A = A + 0.3 * torch.randn(A.shape, generator=generator)
        if "B" in task.plan.trainable:
            B = B + 0.3 * torch.randn(B.shape, generator=generator)
        factors[module] = LoraFactors(A, B, scale)
    return ClientResult(ClientUpdate(factors, size, task.client_id), train_loss=1.0, steps=1, seconds=0.0)


def global_dense(federation, model) -> dict[str, torch.Tensor]:
    """The global model's weight per adapted module (base weights plus the global adapter), float64."""
    (adapter,) = federation.method.evaluation_adapters().values()
    return {m: base_weight(model, m).detach().double().clone() + dense(adapter, m) for m in federation.shapes}


@pytest.mark.parametrize("method", available_aggregators())
def test_round_errors_equal_the_dense_computation(method, client_dir: Path, tmp_path: Path):
    ranks = [4, 3, 2] if aggregator_class(method).heterogeneous_ranks else [3]
    config = tiny_config(client_dir, tmp_path / "run", method=method, ranks=ranks, rounds=3, test_limit=2,
                         validation_fraction=0)
    setup = prepare_run(config, tmp_path / "run", log=lambda message: None)
    federation = setup.federation
    model = setup.model.double()  # merges then add float32 updates to float64 weights without rounding them
    federation.start()
    generator = torch.Generator().manual_seed(1)
    tasks = federation.configure_train(1)
    for server_round in (1, 2, 3):
        personalised = list(federation.method.evaluation_adapters()) != [None]
        before = None if personalised else global_dense(federation, model)
        results = [synthetic_result(task, federation.shapes, config.scale_for(task.plan.rank),
                                    federation.schedule.client_sizes[task.client_id], generator) for task in tasks]
        row = federation.aggregate_train(server_round, iter(results))
        if method in PERSONALISED:
            assert row.aggregation_error is None and row.broadcast_error is None
            assert "aggregation_error" not in row.to_json()  # not measured: absent from metrics.jsonl
            tasks = federation.configure_train(server_round + 1) if server_round < 3 else []
            continue
        after = global_dense(federation, model)
        total = sum(r.update.num_examples for r in results)
        exact = {m: sum((r.update.num_examples / total) * (dense(r.update.factors, m) - dense(t.plan.start, m))
                        for r, t in zip(results, tasks)) for m in federation.shapes}
        error = sum(squared(after[m] - before[m] - exact[m]) for m in exact)
        norm = sum(squared(exact[m]) for m in exact)
        expected = math.sqrt(error / norm)
        assert row.aggregation_error == pytest.approx(expected, rel=1e-6, abs=1e-6)
        if method in EXACT:
            assert row.aggregation_error <= 1e-6
        if method == "fedit":
            assert row.aggregation_error > 1e-2  # the clients' A differ: cross terms
        if server_round == 3:
            break
        # what the next round's clients are sent, against the global adapter it is the change of
        tasks = federation.configure_train(server_round + 1)
        (adapter,) = federation.method.evaluation_adapters().values()
        sizes = federation.schedule.client_sizes
        deviations = {}
        for task in tasks:
            # what a client folds into its weights for the round is part of where it starts (Fed-PLoRA)
            gap = sum(squared(dense(task.plan.start, m) + dense(task.plan.folded, m) - dense(adapter, m)) for m in exact)
            whole = sum(squared(dense(adapter, m)) for m in exact)
            deviations[task.client_id] = math.sqrt(gap / whole) if whole > 0 else 0.0
        if len(tasks) == len(sizes):  # every client sampled: the broadcast error covers them all
            weighted = sum(sizes[cid] * deviations[cid] for cid in sizes) / sum(sizes.values())
            assert row.broadcast_error == pytest.approx(weighted, rel=1e-6, abs=1e-6)
