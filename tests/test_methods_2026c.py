"""RAVAN, Fed-PLoRA and FLoRA with AdaLoRA clients against float64 dense computations of their
definitions, and on the engine.

Each method runs rounds through setup / plan / aggregate / commit on random clients of unequal
size, every client starting from the plan it is given; the references are built here from the
raw tensors in float64, without library code. The engine tests run tiny-llama in-process and
check what the ledger counts; the same runs over Flower are in test_methods_on_flower.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedlora.aggregation import AggregationError, ClientPlan, ClientUpdate, LoraFactors, RunContext, get_aggregator
from fedlora.aggregation.ravan import with_bases
from fedlora.engine.config import ConfigError, save_config
from fedlora.engine.metrics import read_metrics
from fedlora.engine.setup import prepare_run
from fedlora.lora import get_factors, remove_lora, set_factors, set_trainable
from fedlora.lora.adalora import adalora_layers, allocate, attach_adalora, pruned_factors
from fedlora.lora.core import CoredLinear
from fedlora.models import load_model
from fedlora.runtime.inprocess import run_inprocess

import support

SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.self_attn.v_proj": (8, 10)}
EXAMPLES = {"c0": 5, "c1": 17, "c2": 9}
ROUNDS = (1, 2, 3)


def context(ranks: dict[str, int], scale=lambda rank: 2.0) -> RunContext:
    return RunContext(ranks=ranks, scales={cid: scale(rank) for cid, rank in ranks.items()}, shapes=SHAPES, seed=5)


def shares(clients=EXAMPLES) -> list[float]:
    return [count / sum(clients.values()) for count in clients.values()]


def dense(factors: LoraFactors | None) -> torch.Tensor | float:
    """``scale·B·blockdiag(H)·A`` in float64, from the raw tensors."""
    if factors is None:
        return 0.0
    B = factors.B.double()
    if factors.H is not None:
        B = B @ torch.block_diag(*factors.H.double())
    return factors.scale * B @ factors.A.double()


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


def run(client_dir: Path, out: Path, method: str, **overrides):
    """Two rounds of three clients, two a round (so that one misses a round)."""
    config = support.tiny_config(client_dir, out, **{"method": method, "ranks": [2], "rounds": 2,
                                                     "clients_per_round": 2, **overrides})
    out.mkdir(parents=True)
    save_config(config, out / "config.json")
    setup = prepare_run(config, out, log=lambda message: None)
    run_inprocess(setup)
    return setup.federation, read_metrics(out)


# -- RAVAN ------------------------------------------------------------------------------------

HEADS, HEAD_RANK = 3, 2


def ravan_trained(client_id: str, plan: ClientPlan, generator: torch.Generator) -> ClientUpdate:
    """What a client uploads: the start's frozen heads, its own s_h·H_h (random steps from the start's H)."""
    factors = {module: replace(start, H=start.H + 0.3 * torch.randn(start.H.shape, generator=generator))
               for module, start in plan.start.items()}
    return ClientUpdate(factors, EXAMPLES[client_id], client_id)


def test_ravan_averages_the_cores_on_frozen_seeded_heads_exactly():
    method = get_aggregator("ravan", heads=HEADS)
    method.setup(context(dict.fromkeys(EXAMPLES, HEAD_RANK)))
    generator = torch.Generator().manual_seed(1)
    rank = HEADS * HEAD_RANK
    for server_round in ROUNDS:
        plans = {cid: method.plan(cid, server_round) for cid in EXAMPLES}
        for cid, plan in plans.items():
            assert plan.rank == rank and plan.trainable == plan.uploads == {"H"} and plan.sent == {"H"}, cid
            assert plan.drawn.names == {"A", "B"}
            # what a client receives (zeros for A and B) and draws from the seed is the server's start
            received = {module: replace(f, A=torch.zeros_like(f.A), B=torch.zeros_like(f.B))
                        for module, f in plan.start.items()}
            for module, drawn in plan.drawn(received).items():
                start = plan.start[module]
                assert torch.equal(drawn.A, start.A) and torch.equal(drawn.B, start.B) and drawn.H is start.H
                assert start.A.shape == (rank, SHAPES[module][1]) and start.H.shape == (HEADS, HEAD_RANK, HEAD_RANK)
                if server_round == 1:
                    assert not start.H.any()  # the base model to begin with
                else:
                    assert torch.equal(start.H, method.global_update.factors[module].H)
        updates = [ravan_trained(cid, plan, generator) for cid, plan in plans.items()]
        update = method.aggregate(updates, server_round=server_round)
        assert not update.merge and not update.residual
        for module in SHAPES:
            start = plans["c0"].start[module]
            A, B = start.A.double(), start.B.double()
            mean_H = sum(p * u.factors[module].H.double() for p, u in zip(shares(), updates))
            blocks = torch.block_diag(*mean_H)
            got = update.factors[module]
            # the definition, s·Σ_h B_h H̄_h A_h, head by head
            by_heads = sum(B[:, h * HEAD_RANK:(h + 1) * HEAD_RANK] @ mean_H[h] @ A[h * HEAD_RANK:(h + 1) * HEAD_RANK]
                           for h in range(HEADS))
            assert relative(dense(got), 2.0 * by_heads) < 1e-6
            assert relative(dense(got), 2.0 * B @ blocks @ A) < 1e-6
            # exact: Σ p_k ΔW_k
            assert relative(dense(got), sum(p * dense(u.factors[module]) for p, u in zip(shares(), updates))) < 1e-6
            assert relative(update.delta(module, torch.float64), dense(got)) < 1e-12
        method.commit(server_round, update)


def test_ravan_refuses_heads_that_differ_from_the_seeded_ones():
    method = get_aggregator("ravan", heads=2)
    method.setup(context(dict.fromkeys(EXAMPLES, 2)))
    updates = [ravan_trained(cid, method.plan(cid, 1), torch.Generator().manual_seed(2)) for cid in EXAMPLES]
    module = next(iter(SHAPES))
    tampered = updates[1].factors[module]
    updates[1].factors[module] = replace(tampered, B=tampered.B + 1e-3)
    with pytest.raises(AggregationError) as error:
        method.aggregate(updates)
    assert (error.value.rule, error.value.client_id, error.value.module) == ("frozen", "c1", module)


@pytest.mark.parametrize("heads", [0, -1, 1.5, True])
def test_ravan_rejects_a_bad_head_count(heads):
    with pytest.raises(ValueError, match="heads"):
        get_aggregator("ravan", heads=heads)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(10, 12, bias=False)

    def forward(self, x):
        return self.q_proj(x)


def test_a_core_in_a_peft_lora_computes_its_heads_and_trains_only_h_and_s():
    """PEFT's own forward with the core: x·(W + s·B·blockdiag(s_h H_h)·A)ᵀ, against float64."""
    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj"]))
    A, B, H = torch.randn(6, 10), torch.randn(12, 6), torch.randn(3, 2, 2)
    set_factors(model, {"q_proj": LoraFactors(A, B, 4.0, H)})  # scale 4 on an adapter of scaling 2: H doubles
    set_trainable(model, {"H"})
    layer = model.base_model.model.q_proj
    assert isinstance(layer.lora_A["default"], CoredLinear)
    assert {name.split(".")[-1] for name, p in model.named_parameters() if p.requires_grad} == {"core", "head_scale"}
    with torch.no_grad():
        layer.lora_A["default"].head_scale.copy_(torch.tensor([1.0, -0.5, 3.0]))
    x = torch.randn(5, 10)
    scaled = H.double() * 2 * torch.tensor([1.0, -0.5, 3.0], dtype=torch.float64)[:, None, None]
    expected = x.double() @ (layer.base_layer.weight.double()
                             + 2.0 * B.double() @ torch.block_diag(*scaled) @ A.double()).T
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)
    factors = get_factors(model)["q_proj"]  # what a client uploads: s_h·H_h at the adapter's scaling
    assert factors.scale == 2.0 and torch.equal(factors.A, A) and torch.equal(factors.B, B)
    torch.testing.assert_close(factors.H.double(), scaled, rtol=1e-6, atol=1e-6)
    model(x).square().sum().backward()
    assert layer.lora_A["default"].core.grad is not None and layer.lora_A["default"].weight.grad is None


def test_ravan_runs_on_tiny_llama_and_only_the_cores_travel(client_dir, tmp_path):
    federation, rows = run(client_dir, tmp_path / "ravan", "ravan", method_options={"heads": 2})
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert not any(row["rejected"] or row["skipped"] for row in rows[1:])
    assert rows[2]["eval_loss"] != rows[0]["eval_loss"]
    cores = len(federation.shapes) * 2 * 2 * 2  # modules × h × r × r
    for row in rows[1:]:
        clients = len(row["clients"])
        assert row["params_up"] == row["params_down"] == clients * cores  # the frozen heads never travel
        assert row["aggregation_error"] < 1e-5
    for module, factors in federation.method.global_update.factors.items():
        assert factors.rank == 4 and factors.H.shape == (2, 2, 2) and factors.H.any()
        received = {module: replace(factors, A=torch.zeros_like(factors.A), B=torch.zeros_like(factors.B))}
        drawn = with_bases(received, seed=federation.config.seed)[module]
        assert torch.equal(drawn.A, factors.A) and torch.equal(drawn.B, factors.B)


# -- Fed-PLoRA ----------------------------------------------------------------------------------

PLORA_RANKS = {"c0": 4, "c1": 2, "c2": 1}


def lora_trained(client_id: str, plan: ClientPlan, scale: float, generator: torch.Generator) -> ClientUpdate:
    """The client's LoRA as the trainer starts it from ``plan`` (the start at its own scale), then
    random steps on both factors."""
    factors = {}
    for module, start in plan.start.items():
        A = start.A + 0.3 * torch.randn(start.A.shape, generator=generator)
        B = start.B * (start.scale / scale) + 0.3 * torch.randn(start.B.shape, generator=generator)
        factors[module] = LoraFactors(A, B, scale)
    return ClientUpdate(factors, EXAMPLES[client_id], client_id)


def test_fedplora_folds_the_untrained_modules_and_averages_each_module_over_its_trainers():
    method = get_aggregator("fedplora")
    method.setup(context(PLORA_RANKS, scale=lambda rank: 8 / rank))
    generator, drawn = torch.Generator().manual_seed(3), []
    for server_round in ROUNDS:
        glob = method.global_update.factors if method.global_update is not None else None
        plans = {cid: method.plan(cid, server_round) for cid in EXAMPLES}
        chosen = {cid: method.selection(cid, server_round) for cid in EXAMPLES}
        for cid, plan in plans.items():
            assert plan.rank == PLORA_RANKS[cid] == len(chosen[cid]) and plan.trainable == plan.uploads == {"A", "B"}
            assert (plan.folded is None) == (PLORA_RANKS[cid] == 4)
            for module in SHAPES:
                # the client starts from exactly the global model: its modules plus the folded rest
                whole = dense(plan.start[module]) + dense(plan.folded[module] if plan.folded else None)
                reference = method.modules()[module]
                assert relative(whole, dense(reference)) < 1e-12 if reference.B.any() else not whole.any()
                if glob is not None:  # from the global modules themselves, those chosen
                    assert torch.equal(plan.start[module].A, glob[module].A[chosen[cid]])
        assert chosen["c0"] == [0, 1, 2, 3]
        drawn.append(tuple(chosen["c1"]))
        updates = [lora_trained(cid, plan, 8 / plan.rank, generator) for cid, plan in plans.items()]
        update = method.aggregate(updates, server_round=server_round)
        assert not update.merge and update.info["global_rank"] == 4
        p = dict(zip(EXAMPLES, shares()))
        for module in SHAPES:
            previous = method.modules()[module]
            expected = 0.0
            for j in range(4):  # module j averaged over the clients that trained it, float64
                holders = [(p[u.client_id], u.factors[module], chosen[u.client_id].index(j))
                           for u in updates if j in chosen[u.client_id]]
                total = sum(weight for weight, _, _ in holders)
                A_j = sum(weight / total * f.A[i].double() for weight, f, i in holders)
                B_j = sum(weight / total * f.scale * f.B[:, i].double() for weight, f, i in holders)
                expected = expected + torch.outer(B_j, A_j)
            assert relative(dense(update.factors[module]), expected) < 1e-6
            assert previous is not update.factors[module]
        method.commit(server_round, update)
    assert len(set(drawn)) > 1  # a new draw every round


def test_fedplora_with_one_rank_is_fedit():
    method = get_aggregator("fedplora")
    method.setup(context(dict.fromkeys(EXAMPLES, 3)))
    generator = torch.Generator().manual_seed(4)
    plans = {cid: method.plan(cid, 1) for cid in EXAMPLES}
    assert all(plan.folded is None for plan in plans.values())
    updates = [lora_trained(cid, plan, 2.0, generator) for cid, plan in plans.items()]
    ours, fedit = method.aggregate(updates, server_round=1), get_aggregator("fedit").aggregate(updates)
    for module in SHAPES:
        assert relative(ours.delta(module, torch.float64), fedit.delta(module, torch.float64)) < 1e-6


def test_fedplora_runs_on_tiny_llama_leaves_the_base_weights_alone_and_counts_every_module_down(client_dir,
                                                                                                  tmp_path):
    config = support.tiny_config(client_dir, tmp_path / "run", method="fedplora", ranks=[4, 2, 1], rounds=2,
                                 clients_per_round=2)
    (tmp_path / "run").mkdir()
    setup = prepare_run(config, tmp_path / "run", log=lambda message: None)
    pristine = setup.federation.global_model.adapted_weights()
    run_inprocess(setup)
    rows = read_metrics(tmp_path / "run")
    federation = setup.federation
    # every fold was temporary: nothing was merged, so the base weights are the pristine ones, bit for bit
    assert all(torch.equal(weight, pristine[name]) for name, weight in federation.global_model.adapted_weights().items())
    per_rank = sum(d + n for d, n in federation.shapes.values())
    ranks = dict(zip("012", [4, 2, 1]))
    for row in rows[1:]:
        assert not row["rejected"] and row["broadcast_error"] < 1e-9  # each client starts from the global model
        assert row["params_down"] == len(row["clients"]) * 4 * per_rank  # all R modules, trained or folded
        assert row["params_up"] == sum(ranks[cid] for cid in row["clients"]) * per_rank
    assert rows[2]["eval_loss"] != rows[0]["eval_loss"]


# -- FLoRA with AdaLoRA clients ----------------------------------------------------------------

ADALORA = {"budget": 0.5, "tinit": 0.0, "tfinal": 0.0, "delta_t": 1, "beta1": 0.85, "beta2": 0.85,
           "orth_reg_weight": 0.5}


def adalora_client(model, rank: int, seed: int, steps: int = 4):
    """A client's AdaLoRA on ``model`` after ``steps`` SGD steps on a random quadratic of its
    parameters, its budget allocated after each: (PEFT's own ΔW per module in float64, the
    factors the client sends at scale α/r = 2)."""
    peft_model = attach_adalora(model, rank, 2.0 * rank, ["q_proj", "v_proj"], steps, ADALORA, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    targets = [torch.randn(p.shape, generator=generator) for p in params]
    optimizer = torch.optim.SGD(params, lr=0.5)
    for step in range(1, steps + 1):
        loss = sum(((p - t) ** 2).sum() * (1 + i % 3) for i, (p, t) in enumerate(zip(params, targets)))
        loss.backward()
        optimizer.step()
        allocate(peft_model, step)
        optimizer.zero_grad()
    deltas = {name: layer.get_delta_weight("default").double() for name, layer in adalora_layers(peft_model).items()}
    factors = pruned_factors(peft_model, 2.0)
    remove_lora(peft_model)
    return deltas, factors


def test_flora_adalora_stacks_the_clients_pruned_triplets_exactly_against_peft_s_own_deltas():
    model, _ = load_model("tiny-llama", dtype="float32")
    ranks = {"c0": 8, "c1": 4, "c2": 2}
    clients = {cid: adalora_client(model, rank, seed) for seed, (cid, rank) in enumerate(ranks.items())}
    updates = [ClientUpdate(factors, EXAMPLES[cid], cid) for cid, (_, factors) in clients.items()]
    sent = {cid: [f.rank for f in factors.values()] for cid, (_, factors) in clients.items()}
    assert all(max(r) <= ranks[cid] for cid, r in sent.items())
    assert any(len(set(r)) > 1 for r in sent.values())  # the budget moved between modules
    assert sum(map(sum, sent.values())) < sum(rank * len(sent[cid]) for cid, rank in ranks.items())
    method = get_aggregator("flora-adalora")
    method.setup(RunContext(ranks=ranks, scales=dict.fromkeys(ranks, 2.0),
                            shapes={m: tuple(f.shape) for m, f in updates[0].factors.items()}))
    update = method.aggregate(updates)
    assert update.merge and update.info["ranks_sent"] == sum(map(sum, sent.values()))
    assert update.info["flora_ranks"] == sum(rank * len(sent[cid]) for cid, rank in ranks.items())
    for module in updates[0].factors:
        exact = sum(p * clients[cid][0][module] for p, cid in zip(shares(), ranks))
        assert relative(update.delta(module, torch.float64), exact) < 1e-6
        assert update.factors[module].rank == sum(sent[cid][list(updates[0].factors).index(module)] for cid in ranks)


def test_a_fully_pruned_module_sends_one_zero_triplet():
    model, _ = load_model("tiny-llama", dtype="float32")
    peft_model = attach_adalora(model, 2, 4.0, ["q_proj"], 2, ADALORA, seed=0)
    try:
        layers = adalora_layers(peft_model)
        first = next(iter(layers))
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_E["default"].fill_(0.5)
            layers[first].lora_E["default"].zero_()
        factors = pruned_factors(peft_model, 2.0)
    finally:
        remove_lora(peft_model)
    assert factors[first].rank == 1 and not factors[first].A.any()
    assert all(f.rank == 2 for name, f in factors.items() if name != first)


@pytest.mark.parametrize("options", [{"budget": 0}, {"budget": 1.5}, {"tinit": 0.6, "tfinal": 0.5}, {"delta_t": 0},
                                     {"orth_reg_weight": -1.0}, {"beta1": 1.0}])
def test_flora_adalora_rejects_bad_options(options):
    with pytest.raises(ValueError):
        get_aggregator("flora-adalora", **options)


def test_flora_adalora_refuses_sample_level_dp(client_dir, tmp_path):
    with pytest.raises(ConfigError, match="'dp' cannot protect 'flora-adalora'"):
        support.tiny_config(client_dir, tmp_path, method="flora-adalora",
                            dp={"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5})


def test_flora_adalora_runs_on_tiny_llama_and_reports_the_ranks_it_saved(client_dir, tmp_path):
    federation, rows = run(client_dir, tmp_path / "adalora", "flora-adalora", ranks=[4, 2, 1], local_steps=4)
    ranks = dict(zip("012", [4, 2, 1]))
    per_rank = {module: d + n for module, (d, n) in federation.shapes.items()}
    for row in rows[1:]:
        assert not row["rejected"] and row["aggregation_error"] < 1e-6  # exact, whatever the ranks sent
        assert row["flora_ranks"] == sum(ranks[cid] for cid in row["clients"]) * len(per_rank)
        assert len(row["clients"]) * len(per_rank) <= row["ranks_sent"] < row["flora_ranks"]
        # what went up is the pruned factors: between one triplet a module and the assigned ranks
        assert min(per_rank.values()) * row["ranks_sent"] <= row["params_up"] <= max(per_rank.values()) * row["ranks_sent"]
    assert rows[2]["params_down"] > 0  # the round-1 stack, caught up on
