"""The ClientApp: one SuperNode's client, whose base-model replica follows the server's model.

A flwr 1.41 SuperNode starts a fresh ``flwr-clientapp`` process for every message, so nothing
survives between rounds in memory. The replica therefore lives on disk as its log: every base
update the server sends is written to the node's state dir (one safetensors file per round),
and a train message rebuilds the replica by loading the pristine base model and replaying the
log in order through ``trainer.apply_base_update`` – the calls the server made on its own
model – so weights and merge carry are bit-identical to the server's at that round.

After a replay the replayed rounds are folded into one snapshot (the weights merges changed and
the carry, as they are) and their files deleted, so a node's disk and its replay per message
stay bounded by one copy of the adapted weights instead of growing with every round.

The factors a method keeps on its clients live next to the replica, in the
node's client store (``engine/personalisation.py``); since the server never sees them, an
``evaluate`` query has the node evaluate its client's own model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors import safe_open
from safetensors.torch import load_file

from fedlora.aggregation import GlobalUpdate
from fedlora.engine.checkpoint import atomic_save_tensors
from fedlora.engine.personalisation import CLIENT_STATE_DIR, ClientStore, train_from_store
from fedlora.engine.task import ClientResult, ClientTask
from fedlora.engine.update_log import UpdateLog
from fedlora.files import atomic_write_text
from fedlora.imports import resolve
from fedlora.runtime.flower.settings import AppSettings, NodeSettings
from fedlora.runtime.flower.wire import EVALUATE_ACTION, IDENTIFY_ACTION, SYNC_ACTION, Catchup, decode_evaluation, \
    decode_task, encode_metrics, encode_node_state, encode_result, get_catchup


class ReplicaTrainer(Protocol):
    """What a node needs from fedlora's ``LocalTrainer``."""

    model: torch.nn.Module

    def apply_base_update(self, update: GlobalUpdate) -> None: ...

    def replica_state(self) -> dict[str, torch.Tensor]: ...

    def load_replica_state(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def train(self, task: ClientTask, examples: Sequence) -> ClientResult: ...


#: ``client_factory(settings, node)`` → (trainer on the pristine base model, the node's examples)
ClientFactory = Callable[[AppSettings, NodeSettings], tuple[ReplicaTrainer, Sequence]]


SNAPSHOT_FILE = "snapshot.safetensors"


class ReplicaLog(UpdateLog):
    """A replica as the ordered base updates merged into the pristine base model: a snapshot
    of the rounds already folded together, then one file per later round."""

    @property
    def through(self) -> int:
        """The round the replica is merged through (0: the pristine base model)."""
        state = self.directory / "replica.json"
        return json.loads(state.read_text(encoding="utf-8"))["through"] if state.is_file() else 0

    def record(self, catchup: Catchup) -> None:
        """Append the updates of rounds not yet merged; a catch-up that starts after the
        replica's round would leave a gap and is refused."""
        through = self.through
        if catchup.since > through:
            raise ValueError(f"replica in {self.directory} is merged through round {through} but the "
                             f"server sent base updates from round {catchup.since + 1}")
        for server_round, update in catchup.updates:
            if server_round > through:
                self.write(server_round, update)
        atomic_write_text(self.directory / "replica.json",
                          json.dumps({"through": max(through, catchup.through)}))

    def snapshot_round(self) -> int:
        """The last round folded into the snapshot (0: none)."""
        path = self.directory / SNAPSHOT_FILE
        if not path.is_file():
            return 0
        with safe_open(path, framework="pt") as file:
            return int(file.metadata()["through"])

    def replay(self, trainer: ReplicaTrainer) -> None:
        """Rebuild the replica on ``trainer``'s pristine model: the snapshot, then every later
        round oldest first; then fold those rounds into a new snapshot and delete their files."""
        folded = self.snapshot_round()
        if folded:
            trainer.load_replica_state(load_file(self.directory / SNAPSHOT_FILE))
        replayed = [server_round for server_round in self.rounds() if server_round > folded]
        for server_round in replayed:
            trainer.apply_base_update(self.load(server_round))
        if replayed:
            folded = replayed[-1]
            self._write_snapshot(trainer, folded)
        # Snapshot first, files after: a crash in between leaves files the snapshot already
        # holds, which are skipped above and deleted here next time.
        self.delete(server_round for server_round in self.rounds() if server_round <= folded)

    def _write_snapshot(self, trainer: ReplicaTrainer, through: int) -> None:
        atomic_save_tensors(self.directory / SNAPSHOT_FILE, trainer.replica_state(), metadata={"through": str(through)})


def node_replica(context: Context) -> tuple[NodeSettings, ReplicaLog]:
    """This node's settings and its replica log for the current run."""
    node = NodeSettings.from_node_config(context.node_config)
    return node, ReplicaLog(Path(node.state_dir) / f"run-{context.run_id}")


def client_store(replica: ReplicaLog) -> ClientStore:
    """The store of the factors this node's client keeps, next to its replica log."""
    return ClientStore(replica.directory / CLIENT_STATE_DIR)


app = ClientApp()


@app.query(IDENTIFY_ACTION)
def identify(message: Message, context: Context) -> Message:
    """Which partition this node holds and how far its replica is merged."""
    node, replica = node_replica(context)
    return Message(encode_node_state(node.partition_id, replica.through), reply_to=message)


@app.query(SYNC_ACTION)
def sync(message: Message, context: Context) -> Message:
    """Log the base updates the replica lacks; no model is loaded (the log is the replica)."""
    node, replica = node_replica(context)
    replica.record(get_catchup(message.content))
    return Message(encode_node_state(node.partition_id, replica.through), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Catch the replica up, train this round's LoRA on the node's partition (the factors the
    method keeps on clients from the node's own store), send the factors the method uploads."""
    node, replica = node_replica(context)
    if node.threads:
        torch.set_num_threads(node.threads)
    task = decode_task(message.content)
    replica.record(get_catchup(message.content))
    settings = AppSettings.from_run_config(context.run_config)
    factory: ClientFactory = resolve(settings.client_factory)
    trainer, examples = factory(settings, node)
    replica.replay(trainer)
    result = train_from_store(lambda kept: trainer.train(kept, examples), client_store(replica), task)
    return Message(encode_result(result, replica_round=replica.through, uploads=task.plan.uploads), reply_to=message)


@app.query(EVALUATE_ACTION)
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate this node's client's own model: the replica, with the merges the server sent
    applied to it for this evaluation only (the replica's log stays as it is, as the ledger has
    it), and the adapter the server sent completed with the factors kept in the node's store."""
    # imported here: transformers and PEFT cost ~2.5 s, which identify and sync messages, each
    # in a process of its own, need not pay
    from fedlora.engine.global_model import GlobalModel

    node, replica = node_replica(context)
    client_id, server_round, adapter, catchup = decode_evaluation(message.content)
    settings = AppSettings.from_run_config(context.run_config)
    trainer, evaluate_model = resolve(settings.evaluation_factory)(settings, node)
    replica.replay(trainer)
    for update_round, update in catchup.updates:
        if update_round > replica.through:
            trainer.apply_base_update(update)
    own = client_store(replica).personalised(client_id, server_round, adapter)
    with GlobalModel(trainer.model, list(own)).with_adapter(own) as model:
        metrics = evaluate_model(model, server_round)
    return Message(encode_metrics(metrics), reply_to=message)
