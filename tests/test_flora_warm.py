"""flora-warm: exact for any ranks against float64, warm (clients start from the global adapter),
no more download than FLoRA, resumed and Flower runs equal to the in-process run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedlora.aggregation import ClientUpdate, LoraFactors, RunContext, get_aggregator
from fedlora.engine.checkpoint import load_latest_checkpoint
from fedlora.engine.client import LocalTrainer
from fedlora.engine.config import save_config
from fedlora.engine.metrics import read_metrics
from fedlora.engine.restore import restore_global_model
from fedlora.engine.setup import prepare_run
from fedlora.runtime.inprocess import run_inprocess

import support

MODULE = "layer.q_proj"
D, N = 6, 5  # rank 8 exceeds min(d, n)


def dense(factors: LoraFactors) -> torch.Tensor:
    return factors.scale * (factors.B.double() @ factors.A.double())


def leading_then_fresh(start: LoraFactors, rank: int, scale: float, generator: torch.Generator) -> LoraFactors:
    """A client's LoRA of ``rank`` and ``scale`` starting from ``start``: its leading components,
    the rest fresh (A random, B zero), the client's own scale (B rescaled)."""
    extra = rank - start.rank
    return LoraFactors(A=torch.cat([start.A, torch.randn(extra, start.A.shape[1], generator=generator)]),
                       B=torch.cat([start.B * (start.scale / scale), torch.zeros(start.B.shape[0], extra)], dim=1),
                       scale=scale)


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


# -- the aggregation rule, float64 references ----------------------------------------------

CLIENTS = {  # client: (rank, scale, examples); scales α/r and α/√r (rsLoRA) with unequal α
    "big": (8, 16 / 8, 30), "r2": (2, 3 / math.sqrt(2), 10), "r3": (3, 1 / 3, 25), "r4": (4, 7 / math.sqrt(4), 5)}


@pytest.mark.parametrize("sampled", [
    [["big", "r2", "r3", "r4"]] * 3,            # everyone, every round
    [["big", "r3"], ["r2", "r4"], ["r4", "big", "r3"], ["r2"]],  # partial participation, missed rounds
    [["big"]] * 3,                              # one client, rank above min(d, n)
])
def test_every_round_is_exact_for_any_ranks_scales_and_participation(sampled):
    """W_{t+1} + G_{t+1} = W + Σ p_k (M_k − W), where W = W_t + G_t is the global model every
    client starts from (checked too) and M_k = W_t + s_k B_k A_k its trained model."""
    generator = torch.Generator().manual_seed(5)
    method = get_aggregator("flora-warm")
    method.setup(RunContext(ranks={c: r for c, (r, _, _) in CLIENTS.items()},
                            scales={c: s for c, (_, s, _) in CLIENTS.items()}, shapes={MODULE: (D, N)}))
    base = torch.randn(D, N, dtype=torch.float64, generator=generator)  # W_t, merged into in float64
    model = base.clone()  # the float64 reference of the global model
    for server_round, clients in enumerate(sampled, start=1):
        updates = []
        for cid in clients:
            rank, scale, examples = CLIENTS[cid]
            start = method.start_adapter(cid, server_round)
            if start is None:
                assert server_round == 1
                begin = LoraFactors(torch.randn(rank, N, generator=generator), torch.zeros(D, rank), scale)
            else:
                assert start[MODULE].rank <= min(r for r, _, _ in CLIENTS.values())
                begin = leading_then_fresh(start[MODULE], rank, scale, generator)
            assert relative(base + dense(begin), model) < 1e-6  # it starts from the global model
            trained = LoraFactors(begin.A + 0.3 * torch.randn(begin.A.shape, generator=generator),
                                  begin.B + 0.3 * torch.randn(begin.B.shape, generator=generator), scale)
            updates.append((ClientUpdate({MODULE: trained}, examples, cid), base + dense(trained)))
        total = sum(update.num_examples for update, _ in updates)
        expected = model + sum(update.num_examples / total * (trained_model - model) for update, trained_model in updates)

        update = method.aggregate([u for u, _ in updates], server_round=server_round)
        base = base + (dense(update.residual[MODULE]) if MODULE in update.residual else 0)
        method.commit(server_round, update)
        model = base + dense(update.factors[MODULE])
        assert relative(model, expected) < 1e-6, server_round
        assert update.factors[MODULE].rank == update.info["shared_rank"] == 2  # r_min of the run
        assert update.info["broadcast_rank"] <= min(sum(CLIENTS[c][0] for c in clients), N)


def test_one_client_keeps_its_whole_update_in_the_adapter():
    """With one client of the run's smallest rank nothing is merged: it continues its own LoRA."""
    torch.manual_seed(1)
    factors = LoraFactors(torch.randn(3, 40), torch.randn(30, 3), 2.0)
    update = get_aggregator("flora-warm").aggregate([ClientUpdate({MODULE: factors}, 7, "only")])
    assert update.residual == {} and update.info["merged_share"] == 0.0
    assert relative(dense(update.factors[MODULE]), dense(factors)) < 1e-6


@pytest.mark.parametrize("row_norm", [1.0, 1 / math.sqrt(3)])
def test_row_norm_sets_the_adapter_factors_balance_not_its_product(row_norm):
    torch.manual_seed(4)
    updates = [ClientUpdate({MODULE: LoraFactors(torch.randn(r, 9), torch.randn(7, r), 0.5)}, 2, str(r)) for r in (3, 4)]
    plain, scaled = get_aggregator("flora-warm").aggregate(updates), \
        get_aggregator("flora-warm", row_norm=row_norm).aggregate(updates)
    torch.testing.assert_close(scaled.factors[MODULE].A.norm(dim=1), torch.full((3,), row_norm))
    assert relative(dense(scaled.factors[MODULE]), dense(plain.factors[MODULE])) < 1e-6
    with pytest.raises(ValueError, match="row_norm"):
        get_aggregator("flora-warm", row_norm=0)


def test_the_global_adapter_is_the_best_shared_rank_part_and_collapse_is_measured():
    """G_{t+1} is the leading r_min part of the exact update (float64 dense SVD as the reference);
    ``energy_outside_shared_rank`` is the share of the round's update Σ p_k (M_k − W) = S − G_t
    outside its leading r_min directions."""
    generator = torch.Generator().manual_seed(2)
    method = get_aggregator("flora-warm")
    method.setup(RunContext(ranks={"a": 4, "b": 2}, scales={"a": 0.5, "b": 2.0}, shapes={MODULE: (20, 16)}))
    previous = None
    for server_round in (1, 2):
        updates = [ClientUpdate({MODULE: LoraFactors(torch.randn(r, 16, generator=generator),
                                                     torch.randn(20, r, generator=generator), s)}, n, cid)
                   for cid, r, s, n in (("a", 4, 0.5, 3), ("b", 2, 2.0, 1))]
        stacked = sum(u.num_examples / 4 * dense(u.factors[MODULE]) for u in updates)
        update = method.aggregate(updates, server_round=server_round)
        U, S, Vh = torch.linalg.svd(stacked)
        assert relative(dense(update.factors[MODULE]), U[:, :2] * S[:2] @ Vh[:2]) < 1e-6
        change = torch.linalg.svdvals(stacked - (previous if previous is not None else 0))
        outside = (change[2:].square().sum() / change.square().sum()).item()
        assert update.info["energy_outside_shared_rank"] == pytest.approx(outside, rel=1e-5)
        assert update.info["merged_share"] == pytest.approx((S[2:].square().sum() / S.square().sum()).item(), rel=1e-5)
        method.commit(server_round, update)
        previous = dense(update.factors[MODULE])


# -- the engine on tiny-llama ----------------------------------------------------------------

def tiny_config(client_dir: Path, out: Path, **overrides):
    """Ranks 4, 2, 1, two of three clients per round, seeded so that a client misses rounds."""
    return support.tiny_config(client_dir, out, **{"method": "flora-warm", "rounds": 3, "clients_per_round": 2,
                                                  "seed": 7, **overrides})


def global_model_float64(federation) -> dict[str, torch.Tensor]:
    """Base weights plus the bf16 merge carry plus the global adapter, in float64."""
    update = federation.method.global_update
    adapter = update.factors if update is not None else {}
    return {name: weight.double() + federation.global_model.carry.get(name, torch.zeros(())).double()
            + (dense(adapter[name]) if name in adapter else 0)
            for name, weight in federation.global_model.adapted_weights().items()}


@pytest.mark.parametrize("overrides", [{}, {"use_rslora": True, "alpha": 3.0}, {"dtype": "bfloat16"}],
                         ids=["float32", "rslora", "bfloat16"])
def test_engine_rounds_are_exact_and_clients_start_from_the_global_model(client_dir, tmp_path, overrides,
                                                                          monkeypatch):
    """Partial participation (2 of 3 clients, seeded so a client misses rounds), ranks 4, 2, 1:
    each round's global model is W + Σ p_k (M_k − W) in float64, every client's LoRA starts at
    exactly the global adapter (components beyond r_min fresh) and leaves the base bit for bit."""
    setup = prepare_run(tiny_config(client_dir, tmp_path / "run", **overrides), tmp_path / "run",
                        log=lambda message: None)
    federation, trainer = setup.federation, setup.trainer
    federation.start()
    sampled = []
    for server_round in (1, 2, 3):
        before = global_model_float64(federation)
        tasks = federation.configure_train(server_round)
        sampled.append({task.client_id for task in tasks})
        adapter = federation.method.global_update
        for task in tasks:
            if adapter is None:
                assert task.plan.start is None
            else:
                with monkeypatch.context() as patch:  # no steps: the factors the LoRA starts from
                    patch.setattr(LocalTrainer, "_optimize", lambda self, model, task, examples, on_step: ([0.0], 0))
                    started = trainer.train(task, setup.client_examples[task.client_id]).update.factors
                for name, factors in adapter.factors.items():
                    assert relative(dense(started[name]), dense(factors)) < 1e-6, (task.client_id, name)
                    assert started[name].rank == task.plan.rank and not started[name].B[:, factors.rank:].any()
        base = federation.global_model.adapted_weights()
        results = [trainer.train(task, setup.client_examples[task.client_id]) for task in tasks]
        assert all(torch.equal(weight, base[name]) for name, weight in federation.global_model.adapted_weights().items())
        row = federation.aggregate_train(server_round, results).to_json()
        assert not row["rejected"] and row["shared_rank"] == 1
        total = sum(r.update.num_examples for r in results)
        for name, after in global_model_float64(federation).items():
            start = dense(adapter.factors[name]) if adapter is not None else 0
            change = sum(r.update.num_examples / total * (dense(r.update.factors[name]) - start) for r in results)
            assert relative(after - before[name], change) < 1e-6, (server_round, name)
    assert any(cid not in sampled[1] and cid in sampled[2] for cid in sampled[0] | sampled[2])


def run(config, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    run_inprocess(prepare_run(config, out, log=lambda message: None))
    return read_metrics(out)


def test_flora_warm_downloads_no_more_than_flora_and_uploads_the_same(client_dir, tmp_path):
    warm = run(tiny_config(client_dir, tmp_path / "warm", rounds=4), tmp_path / "warm")
    flora = run(tiny_config(client_dir, tmp_path / "flora", rounds=4, method="flora"), tmp_path / "flora")
    assert [row["clients"] for row in warm] == [row["clients"] for row in flora]
    assert [row["params_up"] for row in warm] == [row["params_up"] for row in flora]
    assert all(w["params_down"] <= f["params_down"] for w, f in zip(warm, flora))
    assert warm[1]["eval_loss"] == flora[1]["eval_loss"]  # round 1: both the exact update of fresh LoRAs
    assert warm[4]["eval_loss"] != flora[4]["eval_loss"]
    assert all(0 <= row["energy_outside_shared_rank"] <= row["energy_outside_shared_rank_max"] <= 1
               for row in warm[1:])


def test_export_and_restore_include_the_global_adapter(client_dir, tmp_path):
    rows = run(tiny_config(client_dir, tmp_path / "run", rounds=2), tmp_path / "run")
    restored = restore_global_model(tmp_path / "run")
    assert restored.adapter is not None and restored.completed_round == 2
    assert rows[-1]["eval_loss"] is not None


# -- Flower ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_over_flower_equals_the_in_process_run(client_dir, tmp_path, server_identity):
    """Flower's strategy and ClientApp, every message serialised as Flower does (support's
    in-memory grid); the rank-2 client, not sampled in round 1, catches up on its residual."""
    settings = {"rounds": 2, "clients": 2, "ranks": [4, 2], "clients_per_round": 1, "local_steps": 1, "seed": 0}
    expected = run(tiny_config(client_dir, tmp_path / "inprocess", **settings), tmp_path / "inprocess")
    assert [row["clients"] for row in expected] == [[], ["0"], ["1"]] and expected[1]["residual_rank"] == 2
    out = tmp_path / "flower"
    support.run_on_in_memory_flower(tiny_config(client_dir, out, runtime="flower", **settings), tmp_path / "nodes")

    def timeless(rows):
        return [{key: value for key, value in row.items() if not key.endswith("seconds")} for row in rows]

    assert timeless(read_metrics(out)) == timeless(expected)
    (state, server), (reference_state, reference) = (load_latest_checkpoint(path) for path in (out, tmp_path / "inprocess"))
    assert server.keys() == reference.keys() and state["method"] == reference_state["method"]
    assert all(torch.equal(server[key], reference[key]) for key in reference)  # base weights and adapter
