"""The contract's client-side hooks in the engine: what clients upload (``uploads``), what they
keep in their own store (``kept_on_client``), per-client ranks (``client_rank``) and a local loss
term (``regularizer``); FedSA-LoRA and HetLoRA through them."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedlora.aggregation import ClientPlan, ClientUpdate, LoraFactors, Regularizer, get_aggregator
from fedlora.aggregation.fedit import FedIT
from fedlora.aggregation.registry import AGGREGATORS
from fedlora.engine.config import save_config
from fedlora.engine.gate import received
from fedlora.engine.metrics import read_metrics
from fedlora.engine.personalisation import CLIENT_STATE_DIR, ClientStore, StoredClientModels, train_from_store
from fedlora.engine.setup import prepare_run
from fedlora.engine.task import ClientResult, ClientTask
from fedlora.runtime.inprocess import run_inprocess

from support import tiny_config

SHAPES = {"layers.0.q_proj": (6, 5), "layers.1.v_proj": (4, 5)}
DETERMINISTIC = ("round", "eval_loss", "train_loss", "params_up", "params_down", "clients", "per_client", "rejected")


def factors(rank: int, seed: int, scale: float = 2.0) -> dict[str, LoraFactors]:
    generator = torch.Generator().manual_seed(seed)
    return {m: LoraFactors(torch.randn(rank, n, generator=generator), torch.randn(d, rank, generator=generator), scale)
            for m, (d, n) in SHAPES.items()}


def task(server_round: int, start=None, **fields) -> ClientTask:
    return ClientTask(client_id="c", server_round=server_round, plan=ClientPlan(rank=2, start=start, **fields),
                      alpha=4.0, init_seed=1, data_seed=2, local_steps=1)


def config_for(client_dir: Path, out: Path, **overrides):
    return tiny_config(client_dir, out, **{"ranks": [2], **overrides})


def run(config, out: Path, setup=None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    run_inprocess(setup or prepare_run(config, out, log=lambda message: None))
    return [{key: row.get(key) for key in DETERMINISTIC} for row in read_metrics(out)]


def recording(setup) -> list[tuple[ClientTask, ClientResult]]:
    """Every (task as trained, result) of ``setup``'s trainer, in order."""
    calls, train = [], setup.trainer.train

    def train_recorded(task, examples, on_step=None):
        result = train(task, examples, on_step=on_step)
        calls.append((task, result))
        return result
    setup.trainer.train = train_recorded
    return calls


# -- the client store ---------------------------------------------------------------------------

def test_a_client_store_starts_each_round_from_its_newest_earlier_entry_and_keeps_two(tmp_path):
    store = ClientStore(tmp_path)
    trained = {r: factors(2, seed=r) for r in (1, 3, 4)}
    for server_round, trained_factors in trained.items():
        store.save("c", server_round, trained_factors, frozenset("B"))
    assert store.rounds("c") == [3, 4]  # round 4 started from round 3's entry: older ones go
    assert store.load("c", 2) == {} and store.load("other", 9) == {}
    for through, source in ((3, 3), (9, 4)):
        kept = store.load("c", through)
        assert set(kept) == set(SHAPES) and all(set(f) == {"B"} for f in kept.values())
        assert all(torch.equal(kept[m]["B"], trained[source][m].B) for m in SHAPES)
    adapter = factors(2, seed=9)
    personal = store.personalised("c", 3, adapter)
    for m in SHAPES:  # the server's A, the client's own B, the adapter's scale
        assert torch.equal(personal[m].A, adapter[m].A) and torch.equal(personal[m].B, trained[3][m].B)
        assert personal[m].scale == adapter[m].scale
    assert store.personalised("newcomer", 3, adapter) == adapter
    store.discard_after(3)
    assert store.rounds("c") == [3]


def test_train_from_store_starts_from_the_kept_factors_and_keeps_what_it_trained(tmp_path):
    store, seen = ClientStore(tmp_path), []

    def train(given: ClientTask) -> ClientResult:
        seen.append(given.plan.start)
        update = ClientUpdate(factors(2, seed=10 + given.server_round), 5, given.client_id)
        return ClientResult(update, train_loss=0.0, steps=1, seconds=0.0)

    server_start = {m: replace(f, B=torch.zeros_like(f.B)) for m, f in factors(2, seed=0).items()}
    for server_round in (1, 2):
        train_from_store(train, store, task(server_round, server_start, uploads=frozenset("A"), kept=frozenset("B")))
    assert seen[0] is not server_start and all(not f.B.any() for f in seen[0].values())  # nothing kept yet
    for m in SHAPES:  # round 2 starts from round 1's own B, then keeps round 2's
        assert torch.equal(seen[1][m].B, factors(2, seed=11)[m].B) and torch.equal(seen[1][m].A, server_start[m].A)
        assert torch.equal(store.load("c", 2)[m]["B"], factors(2, seed=12)[m].B)
    # round 2 redone (its first attempt's entry is there, as on a node after the server resumed):
    # it starts from round 1's B again
    train_from_store(train, store, task(2, server_start, uploads=frozenset("A"), kept=frozenset("B")))
    assert all(torch.equal(seen[-1][m].B, factors(2, seed=11)[m].B) for m in SHAPES)
    plain = task(3, server_start)  # a method keeping nothing: trained as given, nothing stored
    train_from_store(train, store, plain)
    assert seen[-1] is server_start and store.rounds("c") == [1, 2]


def test_the_server_takes_what_a_client_does_not_upload_from_the_start_it_sent():
    start, sent = factors(2, seed=1), factors(2, seed=2)
    update = ClientUpdate(sent, 7, "c")
    assert received(update, task(2, start)) is update  # both factors uploaded
    only_A = received(update, task(2, start, uploads=frozenset("A")))
    for m in SHAPES:
        assert torch.equal(only_A.factors[m].A, sent[m].A) and torch.equal(only_A.factors[m].B, start[m].B)
        assert only_A.factors[m].scale == sent[m].scale
    assert only_A.num_examples == 7 and only_A.client_id == "c"


# -- FedSA-LoRA in-process ----------------------------------------------------------------------

def test_fedsa_clients_continue_from_their_own_B_which_only_their_store_holds(client_dir, tmp_path):
    out = tmp_path / "fedsa"
    config = config_for(client_dir, out, method="fedsa")
    setup = prepare_run(config, out, log=lambda message: None)
    calls = recording(setup)
    rows = run(config, out, setup)
    first = {t.client_id: r.update.factors for t, r in calls if t.server_round == 1}
    for t, _ in calls:
        if t.server_round == 2:  # the client's own B of round 1 (with Ā of round 1)
            assert all(torch.equal(f.B, first[t.client_id][m].B) for m, f in t.plan.start.items())
            assert t.plan.uploads == {"A"} and t.plan.kept == {"B"}
    store = ClientStore(out / CLIENT_STATE_DIR)
    for t, result in calls:
        if t.server_round == 2:
            kept = store.load(t.client_id, 2)
            assert all(torch.equal(kept[m]["B"], f.B) for m, f in result.update.factors.items())
    # the server's state holds no client's B: its global B is zero
    assert all(not f.B.any() for f in setup.federation.method.global_update.factors.values())
    # each client is evaluated with its own B
    assert len({m["eval_loss"] for m in rows[2]["per_client"].values()}) == 3
    assert rows[2]["eval_loss"] == pytest.approx(sum(m["eval_loss"] for m in rows[2]["per_client"].values()) / 3)


def test_a_fedsa_round_redone_on_resume_starts_from_the_entries_before_it(client_dir, tmp_path):
    uninterrupted = run(config_for(client_dir, tmp_path / "full", method="fedsa"), tmp_path / "full")
    first = config_for(client_dir, tmp_path / "resumed", method="fedsa", rounds=1)
    run(first, tmp_path / "resumed")
    # a killed attempt at round 2 left entries the checkpoint does not know
    store = ClientStore(tmp_path / "resumed" / CLIENT_STATE_DIR)
    for cid in ("0", "1", "2"):
        stale = {m: LoraFactors(f["B"].new_zeros(1, 1), 1e3 * torch.ones_like(f["B"]))
                 for m, f in store.load(cid, 1).items()}
        store.save(cid, 2, stale, frozenset("B"))
    assert run(first.replace(rounds=2), tmp_path / "resumed") == uninterrupted


class RecordingClientModels(StoredClientModels):
    """The run folder's client models, noting what each evaluation was given."""

    def __init__(self, store: ClientStore):
        super().__init__(store)
        self.calls: list[tuple[int, list[str], frozenset[str]]] = []

    def evaluate(self, server_round, adapters, kept, evaluate_here):
        self.calls.append((server_round, sorted(adapters), kept))
        return super().evaluate(server_round, adapters, kept, evaluate_here)


def test_the_clients_own_models_are_evaluated_by_the_runtime_that_holds_them(client_dir, tmp_path):
    """A personalised method's models are evaluated where the runtime says they live (given at
    construction), told which factors each client completes from its own store."""
    models = RecordingClientModels(ClientStore(tmp_path / "run" / CLIENT_STATE_DIR))
    setup = prepare_run(config_for(client_dir, tmp_path / "run", method="fedsa", rounds=1), tmp_path / "run",
                        log=lambda message: None, client_models=models)
    run_inprocess(setup)
    assert models.calls == [(0, ["0", "1", "2"], {"B"}), (1, ["0", "1", "2"], {"B"})]


class UploadsWhatItKeeps(FedIT):
    """test method: keeps B on the clients but asks for it back"""
    name = "uploads-kept"
    kept_on_client = frozenset("B")

    def uploads(self, server_round):
        return frozenset("AB")


class NoStart(FedIT):
    """test method: uploads only A but gives clients no start to take B from"""
    name = "no-start"

    def uploads(self, server_round):
        return frozenset("A")

    def start_adapter(self, client_id, server_round):
        return None


@pytest.mark.parametrize("method, message", [(UploadsWhatItKeeps, "sends \\['B'\\], which it keeps"),
                                             (NoStart, "does not send every factor needs a start")])
def test_the_engine_refuses_a_method_whose_uploads_it_cannot_honour(client_dir, tmp_path, monkeypatch, method,
                                                                    message):
    monkeypatch.setitem(AGGREGATORS, method.name, f"{__name__}:{method.__name__}")
    setup = prepare_run(config_for(client_dir, tmp_path / "run", method=method.name), tmp_path / "run",
                        log=lambda message: None)
    setup.federation.start()
    with pytest.raises(ValueError, match=message):
        setup.federation.configure_train(1)


# -- HetLoRA: per-client ranks and a local loss term ----------------------------------------------

def tail(update_factors: dict[str, LoraFactors], gamma: float) -> float:
    """Σ_modules ‖s·B[:, k:]·A[k:]‖_F in float64 (k = ⌊γ·r⌋, at least 1): the components pruning drops."""
    total = 0.0
    for f in update_factors.values():
        keep = max(1, math.floor(gamma * f.rank))
        total += (f.scale * f.B.double()[:, keep:] @ f.A.double()[keep:]).norm().item()
    return total


def test_hetlora_clients_train_the_ranks_self_pruning_gives_them_and_a_resume_keeps_them(client_dir, tmp_path):
    options = {"method": "hetlora", "ranks": [4, 2, 1], "rounds": 3, "method_options": {"gamma": 0.5, "penalty": 1.0}}
    config = config_for(client_dir, tmp_path / "full", **options)
    setup = prepare_run(config, tmp_path / "full", log=lambda message: None)
    calls = recording(setup)
    uninterrupted = run(config, tmp_path / "full", setup)
    assert not any(row["rejected"] for row in uninterrupted)  # the engine accepts the pruned ranks
    rank = {r: {t.client_id: t.plan.rank for t, _ in calls if t.server_round == r} for r in (1, 2, 3)}
    tails = {r: {t.client_id: tail(res.update.factors, 0.5) for t, res in calls if t.server_round == r} for r in (1, 2)}
    assert rank[1] == rank[2] == {"0": 4, "1": 2, "2": 1}  # no earlier tail to compare with before round 2
    expected = {cid: max(1, r // 2) if tails[2][cid] < tails[1][cid] else r for cid, r in rank[2].items()}
    assert rank[3] == expected and rank[3] != rank[2], (tails, rank)
    assert all(f.rank == t.plan.rank for t, res in calls for f in res.update.factors.values())

    first = config_for(client_dir, tmp_path / "resumed", **{**options, "rounds": 2})
    run(first, tmp_path / "resumed")
    assert run(first.replace(rounds=3), tmp_path / "resumed") == uninterrupted


#: whether each call of :func:`pull_every_B_up` saw factors that train
PULLS: list[bool] = []


def pull_every_B_up(live: dict[str, LoraFactors], *, strength: float) -> torch.Tensor:
    PULLS.append(all(f.A.requires_grad and f.B.requires_grad for f in live.values()))
    return -strength * sum(f.B.sum() for f in live.values())  # its gradient dwarfs the batch loss's


def test_the_trainer_adds_the_plans_term_on_the_live_factors_to_its_loss(client_dir, tmp_path):
    config = config_for(client_dir, tmp_path / "run", method="hetlora", method_options={"penalty": 0.5})
    setup = prepare_run(config, tmp_path / "run", log=lambda message: None)
    federation = setup.federation
    federation.start()
    one = replace(federation.configure_train(1)[0], local_steps=1)
    assert one.plan.regularizer.options["penalty"] == 0.5  # the run's method, with its options
    assert get_aggregator("fedit").regularizer() is None  # the contract's default: no term
    examples = setup.client_examples[one.client_id]
    reference = setup.trainer.train(replace(one, plan=replace(one.plan, regularizer=None)), examples)

    PULLS.clear()
    pulled = Regularizer(f"{__name__}:pull_every_B_up", {"strength": 1e6})
    result = setup.trainer.train(replace(one, plan=replace(one.plan, regularizer=pulled)), examples)
    assert PULLS == [True] * config.grad_accum  # once per batch, on parameters that train
    assert result.train_loss == reference.train_loss  # the reported loss is the batch's alone
    for module, f in result.update.factors.items():  # AdamW's first step moves each entry by lr·sign(grad)
        assert torch.allclose(f.B, torch.full_like(f.B, config.lr), rtol=1e-4), module
        assert not torch.allclose(reference.update.factors[module].B, torch.full_like(f.B, config.lr))
