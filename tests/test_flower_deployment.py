"""The Flower transport in memory: against a fake Federation and trainer, and with fedlora's
real factories when the clients' records live only on the nodes (real processes:
test_flower_engine.py).

The fakes stand in for fedlora's engine with the same interface; their client factors depend
on the replica's base weights, so a replica that missed or misordered a base update would
change the server's model, which must equal an in-process run bit for bit.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Array
from safetensors.torch import save_file

from fedlora.aggregation import AggregationError, ClientPlan, ClientUpdate, GlobalUpdate, LoraFactors
from fedlora.engine.ledger import Ledger
from fedlora.engine.task import ClientFailure, ClientResult, ClientTask
from fedlora.runtime.flower import client_app
from fedlora.runtime.flower.client_app import ReplicaLog
from fedlora.runtime.flower.clients import FlowerClients, ReceivedUpdates
from fedlora.runtime.flower.server import SYNC, FlowerRounds
from fedlora.runtime.flower.server_app import serve
from fedlora.runtime.flower.settings import AppSettings, NodeSettings

from support import InMemoryGrid, comparable, in_memory_grid, run_tiny, tiny_config

SHAPES = {"layers.0.q_proj": (12, 10), "layers.1.v_proj": (8, 12)}
PARAMS_FILE = "fake.json"


# --- the fakes (imported by the ServerApp and ClientApp processes through PYTHONPATH) ----------

def initial_weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return {m: torch.randn(d, n, generator=generator) for m, (d, n) in SHAPES.items()}


def merge_into(weights: dict[str, torch.Tensor], update: GlobalUpdate) -> None:
    """The one merge both sides use, as fedlora's merge_update is for server and clients."""
    for module in weights:
        if update.merge and module in update.factors:
            weights[module] += update.factors[module].delta(torch.float32)
        if module in update.residual:
            weights[module] += update.residual[module].delta(torch.float32)


class FakeTrainer:
    """A replica of the base weights; its factors depend on them (a stale replica shows)."""

    def __init__(self):
        self.weights = initial_weights()

    def apply_base_update(self, update: GlobalUpdate) -> None:
        merge_into(self.weights, update)

    def replica_state(self) -> dict[str, torch.Tensor]:
        return {f"weight/{module}": weight for module, weight in self.weights.items()}

    def load_replica_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.weights = {key.removeprefix("weight/"): weight.clone() for key, weight in tensors.items()}

    def train(self, task: ClientTask, examples) -> ClientResult:
        generator = torch.Generator().manual_seed(task.data_seed)
        factors = {}
        for module, (d, n) in SHAPES.items():
            A = 0.1 * torch.randn(task.plan.rank, n, generator=generator) + 0.01 * self.weights[module][:task.plan.rank]
            B = 0.1 * torch.randn(d, task.plan.rank, generator=generator)
            factors[module] = LoraFactors(A, B, task.alpha / task.plan.rank)
        update = ClientUpdate(factors=factors, num_examples=len(examples), client_id=task.client_id)
        return ClientResult(update=update, train_loss=float(self.weights["layers.0.q_proj"].sum()),
                            steps=task.local_steps, seconds=0.0)


class FakeFederation:
    """Samples ``fraction`` of the clients, stacks their factors (FLoRA-style, weighted by
    examples) and merges the stack into its base weights; skips rounds below ``min_clients``.
    It hands each merge to ``on_merge`` (the Flower runtime's base log) and keeps a ledger of
    them, as the Federation does."""

    def __init__(self, run_dir: Path, rounds: int, ranks: list[int], fraction: float, min_clients: int, *,
                 on_merge=lambda server_round, update: None):
        self.run_dir = Path(run_dir)
        self.config = SimpleNamespace(rounds=rounds)
        self.schedule = SimpleNamespace(client_ids=[f"client-{i}" for i in range(len(ranks))])
        self.client_ids = self.schedule.client_ids
        self.ranks = dict(zip(self.client_ids, ranks))
        self.fraction = fraction
        self.min_clients = min_clients
        self.on_merge = on_merge
        self.weights = initial_weights()
        self.base_log: dict[int, GlobalUpdate] = {}
        self.rows: list[dict] = []
        self.ledger = Ledger(0, self.client_ids)  # where the replicas are, as the runtime reports them

    def start(self) -> int:
        return 0

    def configure_train(self, server_round: int) -> list[ClientTask]:
        count = round(self.fraction * len(self.client_ids))
        chosen = set(random.Random(server_round).sample(self.client_ids, count))
        return [ClientTask(client_id=cid, server_round=server_round, plan=ClientPlan(rank=self.ranks[cid]),
                           alpha=2.0 * self.ranks[cid], init_seed=server_round, data_seed=100 * server_round + i,
                           local_steps=1)
                for i, cid in enumerate(self.client_ids) if cid in chosen]

    def base_updates_since(self, last_round: int) -> list[tuple[int, GlobalUpdate]]:
        return [(r, self.base_log[r]) for r in sorted(self.base_log) if r > last_round]

    def aggregate_train(self, server_round: int, results: list[ClientResult],
                        failures: list[ClientFailure] = (), refused: list[AggregationError] = ()) -> dict:
        results = list(results)  # an iterable, as Federation.aggregate_train takes
        skipped = len(results) < self.min_clients
        if not skipped:
            total = sum(r.update.num_examples for r in results)
            factors = {m: LoraFactors(torch.cat([r.update.factors[m].A for r in results]),
                                      torch.cat([r.update.factors[m].B * r.update.factors[m].scale
                                                 * (r.update.num_examples / total) for r in results], dim=1))
                       for m in SHAPES}
            # a residual in round 2 exercises the residual path of the catch-up
            residual = {m: LoraFactors(0.5 * f.A[:1], f.B[:, :1], 0.25) for m, f in factors.items()} \
                if server_round == 2 else {}
            update = GlobalUpdate(factors=factors, merge=True, residual=residual)
            merge_into(self.weights, update)
            self.base_log[server_round] = update
            self.on_merge(server_round, update)
            self.ledger.merged(server_round, sum(f.A.numel() + f.B.numel()
                                                 for f in (*update.factors.values(), *update.residual.values())))
        row = {"round": server_round, "clients": [r.update.client_id for r in results],
               "ranks": [r.update.factors["layers.0.q_proj"].rank for r in results],
               "failures": [f.__dict__ for f in failures], "skipped": skipped,
               "rejected": [{"client_id": e.client_id, "rule": e.rule, "reason": str(e)} for e in refused]}
        self.rows.append(row)
        save_file({m: w.clone() for m, w in self.weights.items()}, self.run_dir / "server-model.safetensors")
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")
        return row

    def summary(self) -> dict:
        return {"rounds": len(self.rows)}


def build_federation(run_dir: Path, *, on_merge, **runtime) -> FakeFederation:
    return FakeFederation(run_dir, **json.loads((Path(run_dir) / PARAMS_FILE).read_text()), on_merge=on_merge)


def build_client(settings: AppSettings, node: NodeSettings) -> tuple[FakeTrainer, list[int]]:
    return FakeTrainer(), list(range(10 + 5 * node.partition_id))


def in_process_weights(tmp_path: Path, params: dict) -> dict[str, torch.Tensor]:
    """The reference: the same fakes driven like fedlora's in-process runtime (clients train
    on the server's current model)."""
    reference_dir = tmp_path / "in-process"
    reference_dir.mkdir()
    federation = FakeFederation(reference_dir, **params)
    for server_round in range(1, federation.config.rounds + 1):
        results = []
        for task in federation.configure_train(server_round):
            trainer = FakeTrainer()
            trainer.weights = {m: w.clone() for m, w in federation.weights.items()}
            results.append(trainer.train(task, list(range(10 + 5 * int(task.client_id.split("-")[1])))))
        federation.aggregate_train(server_round, results)
    return federation.weights


def setup_run(tmp_path: Path, params: dict, round_timeout: float) -> AppSettings:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / PARAMS_FILE).write_text(json.dumps(params))
    return AppSettings(run_dir=str(run_dir), federation_factory=f"{__name__}:build_federation",
                       client_factory=f"{__name__}:build_client", round_timeout=round_timeout,
                       connect_timeout=30.0)


def replica_weights(state_dir: Path) -> dict[str, torch.Tensor]:
    """A node's replica rebuilt from its log, as its ClientApp does."""
    (run_state,) = state_dir.glob("run-*")
    trainer = FakeTrainer()
    ReplicaLog(run_state).replay(trainer)
    return trainer.weights


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for module in expected:
        assert torch.equal(actual[module], expected[module]), module


# --- in memory: the ServerApp loop and ClientApp over a Grid that serialises every message (support.InMemoryGrid)

def in_memory_run(tmp_path: Path, params: dict, dead: set[int] = frozenset()):
    settings = setup_run(tmp_path, params, round_timeout=1.0)
    nodes = {1000 + i: {"partition-id": i, "state-dir": str(tmp_path / f"node-{i}")}
             for i in range(len(params["ranks"]))}
    grid = InMemoryGrid(nodes, settings.to_run_config())
    grid.dead = {1000 + i for i in dead}
    federation, report = serve(grid, replace(settings, connect_timeout=0.0))
    return federation, report, grid


def test_partial_participation_matches_in_process_and_every_replica_ends_equal(tmp_path, server_identity):
    params = {"rounds": 4, "ranks": [2, 4, 8], "fraction": 2 / 3, "min_clients": 1}
    federation, report, grid = in_memory_run(tmp_path, params)
    assert all(len(row["clients"]) == 2 and not row["failures"] for row in federation.rows)
    assert {rank for row in federation.rows for rank in row["ranks"]} == {2, 4, 8}
    assert_identical(federation.weights, in_process_weights(tmp_path, params))
    assert report["replica_round"] == {"client-0": 4, "client-1": 4, "client-2": 4}
    for i in range(3):
        assert_identical(replica_weights(tmp_path / f"node-{i}"), federation.weights)
    # catch-up bytes are counted where a client had missed merges
    assert sum(t["catchup_bytes"] for t in report["transfers"].values()) > 0
    # the final sync sends each client every merge from the round it last trained in onwards
    update_bytes = {r: 4 * sum(f.A.numel() + f.B.numel() for f in (*u.factors.values(), *u.residual.values()))
                    for r, u in federation.base_updates_since(0)}
    last_trained = {cid: max((row["round"] for row in federation.rows if cid in row["clients"]), default=1)
                    for cid in report["replica_round"]}
    assert report["sync_transfer"]["catchup_bytes"] == sum(
        update_bytes[r] for last in last_trained.values() for r in update_bytes if r >= last) > 0
    assert report["sync_transfer"]["bytes_down"] > report["sync_transfer"]["catchup_bytes"]


def test_a_dead_node_is_a_recorded_failure_and_the_round_needs_min_clients(tmp_path, server_identity):
    params = {"rounds": 2, "ranks": [2, 4, 8], "fraction": 1.0, "min_clients": 3}
    federation, report, grid = in_memory_run(tmp_path, params, dead={2})
    for row in federation.rows:
        assert row["clients"] == ["client-0", "client-1"] and row["skipped"]
        assert [(f["client_id"], f["reason"]) for f in row["failures"]] == [("client-2", "no SuperNode holds "
                                                                               "this client's partition")]
    assert [f["client_id"] for f in report["sync_failures"]] == []  # never identified, so never synced


def three_nodes_three_rounds(tmp_path: Path) -> tuple[FakeFederation, FlowerRounds, InMemoryGrid]:
    """A started federation of three nodes, identified, for a test to drive round by round."""
    params = {"rounds": 3, "ranks": [2, 4, 8], "fraction": 1.0, "min_clients": 2}
    settings = setup_run(tmp_path, params, round_timeout=1.0)
    nodes = {1000 + i: {"partition-id": i, "state-dir": str(tmp_path / f"node-{i}")} for i in range(3)}
    grid = InMemoryGrid(nodes, settings.to_run_config())
    clients = FlowerClients(grid, settings.run_dir, round_timeout=1.0, connect_timeout=0.0)
    federation = build_federation(Path(settings.run_dir), on_merge=clients.base_log.write)
    rounds = FlowerRounds(federation, clients, ReceivedUpdates())
    federation.start()
    clients.identify(federation.client_ids, wait=True, reported=federation.ledger.replica_through)
    return federation, rounds, grid


def test_a_node_dying_mid_run_misses_rounds_and_catches_up_when_back(tmp_path, server_identity):
    federation, rounds, grid = three_nodes_three_rounds(tmp_path)
    for server_round in (1, 2, 3):
        grid.dead = {1002} if server_round == 2 else set()
        rounds.round(server_round)
    rounds.synchronize_replicas(3)
    assert [f["client_id"] for f in federation.rows[1]["failures"]] == ["client-2"]
    assert "no reply within 1 s" in federation.rows[1]["failures"][0]["reason"]
    assert not federation.rows[2]["failures"] and not federation.rows[1]["skipped"]
    # round 3's message to client-2 carried the merges of rounds 1 and 2 it had missed
    last_to_client_2 = [m for m in grid.sent if m.metadata.dst_node_id == 1002
                        and m.metadata.message_type == "train"][-1]
    assert last_to_client_2.content.config_records["catchup"]["rounds"] == [1, 2]
    for i in range(3):
        assert_identical(replica_weights(tmp_path / f"node-{i}"), federation.weights)


def test_a_node_restarted_with_an_empty_replica_gets_and_is_charged_every_merge(tmp_path, server_identity):
    federation, rounds, grid = three_nodes_three_rounds(tmp_path)
    for server_round in (1, 2, 3):
        if server_round == 3:  # client-0's SuperNode comes back under a new id with its state lost
            del grid.nodes[1000]
            grid.nodes[1003] = {"partition-id": 0, "state-dir": str(tmp_path / "node-0-fresh")}
            rounds.clients.identify(federation.client_ids, wait=False, reported=federation.ledger.replica_through)
            assert federation.ledger.merged_through == {"client-0": 0, "client-1": 1, "client-2": 1}
        rounds.round(server_round)
    to_fresh_node = [m for m in grid.sent if m.metadata.dst_node_id == 1003 and m.metadata.message_type == "train"]
    assert to_fresh_node[0].content.config_records["catchup"]["rounds"] == [1, 2]
    rounds.synchronize_replicas(3)
    assert_identical(replica_weights(tmp_path / "node-0-fresh"), federation.weights)


def test_the_final_sync_skips_a_node_that_left_its_last_task_unanswered_not_one_back_under_a_new_id(
        tmp_path, server_identity):
    federation, rounds, grid = three_nodes_three_rounds(tmp_path)
    for server_round in (1, 2, 3):
        grid.dead = {1001, 1002} if server_round == 3 else set()
        rounds.round(server_round)
    # after the last round client-1's SuperNode comes back under a new id with its state; client-2's stays down
    grid.nodes[1004] = grid.nodes.pop(1001)
    rounds.synchronize_replicas(3)
    assert [(f.client_id, f.reason) for f in rounds.sync_failures] == [
        ("client-2", "sync: not sent, its round-3 task went unanswered")]
    assert [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == SYNC] == [1000, 1004]
    for i in range(2):
        assert_identical(replica_weights(tmp_path / f"node-{i}"), federation.weights)


def test_an_undecodable_or_replayed_reply_is_rejected_under_its_rule(tmp_path, server_identity, monkeypatch):
    """client-1's first reply holds bytes that are no array; client-2 sends its first reply again;
    client-0's second reply claims a replica round its task's catch-up cannot have left it at."""
    honest_encode, replies = client_app.encode_result, {}

    def hostile_encode(result, *, replica_round, **options):
        client = result.update.client_id
        if client == "client-0" and client in replies:
            replica_round = 99
        content = replies.get(client) if client == "client-2" else None
        content = content or honest_encode(result, replica_round=replica_round, **options)
        if client == "client-1" and client not in replies:
            name = next(iter(content.array_records["update"]))
            content.array_records["update"][name] = Array(dtype="float32", shape=(1,), stype="numpy.ndarray",
                                                          data=b"no npy")
        replies.setdefault(client, content)
        return content
    monkeypatch.setattr(client_app, "encode_result", hostile_encode)
    params = {"rounds": 2, "ranks": [2, 4, 8], "fraction": 1.0, "min_clients": 1}
    federation, _, _ = in_memory_run(tmp_path, params)
    assert [(r["client_id"], r["rule"]) for r in federation.rows[0]["rejected"]] == [("client-1", "record")]
    assert "is not a .npy array" in federation.rows[0]["rejected"][0]["reason"]
    assert [(r["client_id"], r["rule"]) for r in federation.rows[1]["rejected"]] == [("client-0", "record"),
                                                                                      ("client-2", "replay")]
    assert "replica-round 99" in federation.rows[1]["rejected"][0]["reason"]
    assert federation.rows[0]["clients"] == ["client-0", "client-2"]
    assert federation.rows[1]["clients"] == ["client-1"]
    assert not any(row["failures"] for row in federation.rows)


def test_a_client_error_becomes_a_failure_with_its_reason(tmp_path, server_identity, monkeypatch):
    def broken_train(self, task, examples):
        raise RuntimeError(f"out of memory on {task.client_id}")
    monkeypatch.setattr(FakeTrainer, "train", broken_train)
    params = {"rounds": 1, "ranks": [2, 4], "fraction": 1.0, "min_clients": 1}
    federation, _, _ = in_memory_run(tmp_path, params)
    (row,) = federation.rows
    assert row["skipped"] and [f["client_id"] for f in row["failures"]] == ["client-0", "client-1"]
    assert "out of memory on client-0" in row["failures"][0]["reason"]


# --- the real factories ------------------------------------------------------------------------

def test_a_reply_replayed_after_the_server_resumed_is_still_a_replay(client_dir, tmp_path, server_identity,
                                                                      monkeypatch):
    """The digests of received updates are checkpointed: client 0 sends its round-1 reply again
    in round 2, after the server crashed between the rounds and resumed from round 1."""
    from fedlora.engine.config import save_config
    from fedlora.engine.metrics import read_metrics
    from fedlora.runtime.flower import runner

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = tiny_config(client_dir, run_dir, runtime="flower", rounds=2, fraction=1.0, local_steps=1)
    save_config(config, run_dir / "config.json")
    honest_encode, first_replies = client_app.encode_result, {}

    def replaying_encode(result, *, replica_round, **options):
        client = result.update.client_id
        if client == "0" and client in first_replies:
            return first_replies[client]
        content = honest_encode(result, replica_round=replica_round, **options)
        first_replies.setdefault(client, content)
        return content
    monkeypatch.setattr(client_app, "encode_result", replaying_encode)

    settings = replace(runner.app_settings(config, run_dir), round_timeout=60.0, connect_timeout=0.0)
    train_round = FlowerRounds.round

    def killed_before_round_2(self, server_round):
        if server_round == 2:
            raise SystemExit("the server is killed")
        return train_round(self, server_round)
    with monkeypatch.context() as patch:
        patch.setattr(FlowerRounds, "round", killed_before_round_2)
        with pytest.raises(SystemExit):
            serve(in_memory_grid(config, tmp_path / "nodes"), settings)
    assert [row["round"] for row in read_metrics(run_dir)] == [0, 1]

    serve(in_memory_grid(config, tmp_path / "nodes"), settings)
    rows = read_metrics(run_dir)
    assert rows[1]["clients"] == ["0", "1", "2"] and rows[2]["clients"] == ["1", "2"]
    assert [(r["client_id"], r["rule"]) for r in rows[2]["rejected"]] == [("0", "replay")]
    assert "the one it sent in round 1" in rows[2]["rejected"][0]["reason"]


# --- the real factories, with the clients' records only on the nodes ------------------------

def test_with_data_on_nodes_the_server_reads_no_records_and_matches_in_process(client_dir, tmp_path, server_identity):
    from fedlora.engine.config import save_config
    from fedlora.engine.restore import restore_global_model
    from fedlora.engine.metrics import read_metrics
    from fedlora.runtime.flower import client_factory, runner, server_factory

    settings = {"rounds": 2, "fraction": 2 / 3, "ranks": [4, 2, 1], "local_steps": 1, "min_clients": 1}
    expected = run_tiny(client_dir, tmp_path / "inprocess", **settings)

    run_dir = tmp_path / "server"
    run_dir.mkdir()
    # the server's `data` names no real folder: reading it would fail the run
    config = tiny_config(tmp_path / "nowhere", run_dir, runtime="flower", superlink="127.0.0.1:1",
                         data_on_nodes=True, clients=3, test_data=str(client_dir / "global_test.json"), **settings)
    save_config(config, run_dir / "config.json")
    assert runner.node_settings(config) == []  # the launcher reads no records either
    app_settings = AppSettings(run_dir=str(run_dir), federation_factory=f"{server_factory.__name__}:federation_factory",
                               client_factory=f"{client_factory.__name__}:client_factory", round_timeout=60.0,
                               run_config=json.dumps(config.to_dict()))
    nodes = {1000 + i: {"partition-id": i, "data": str(client_dir / f"local_training_{i}.json"),
                        "state-dir": str(tmp_path / f"node-{i}")} for i in range(3)}
    _, report = serve(InMemoryGrid(nodes, app_settings.to_run_config()), replace(app_settings, connect_timeout=0.0))

    assert comparable(read_metrics(run_dir)) == comparable(expected)
    assert report["replica_round"] == {"0": 2, "1": 2, "2": 2}
    server = restore_global_model(run_dir).global_model.adapted_weights()
    reference = restore_global_model(tmp_path / "inprocess").global_model.adapted_weights()
    assert_identical(server, reference)

    # a SuperNode started without its records fails, saying what to do
    with pytest.raises(ValueError, match=r"partition 1: .*--node-config 'data="):
        client_factory.client_factory(app_settings, NodeSettings(1))
