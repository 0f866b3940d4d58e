"""The Flower strategy that drives fedlora's :class:`Federation` over a Grid.

Every sampled client gets its own message, addressed to the SuperNode holding its partition
(learned by an ``identify`` query: partition ``p`` holds ``federation.client_ids[p]``), with
its own task and the base updates its replica has not merged yet. Replies are matched to
clients by the id of the message they answer, so error replies the SuperLink makes for an
unreachable node are attributed too; missing and failed replies become
:class:`ClientFailure`\\ s and the Federation decides whether enough clients answered.

A reply is bytes from a machine the server does not control: one that does not decode, or
whose update repeats one already received (a replay), is rejected here with its rule
(``record``, ``replay``) next to the Federation's own rejections.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import asdict
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.aggregation import AggregationError, LoraFactors
from fedlora.engine.federation import ClientFailure, Federation
from fedlora.engine.ledger import BYTES_PER_PARAM
from fedlora.runtime.flower.codec import EVALUATE_ACTION, IDENTIFY_ACTION, SYNC_ACTION, UPDATE_KEY, Catchup, \
    CodecError, decode_metrics, decode_node_state, decode_result, encode_evaluation, encode_task, put_catchup, \
    wire_bytes

IDENTIFY = f"{MessageType.QUERY}.{IDENTIFY_ACTION}"
SYNC = f"{MessageType.QUERY}.{SYNC_ACTION}"
EVALUATE = f"{MessageType.QUERY}.{EVALUATE_ACTION}"
#: seconds between looks for SuperNodes that have not connected yet
_NODE_POLL_SECONDS = 1.0
#: seconds between pulls for replies (Grid.send_and_receive waits 3 s between pulls)
_REPLY_POLL_SECONDS = 0.25


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Push ``messages`` and pull their replies until all are in or ``timeout`` seconds pass."""
    if not messages:
        return []
    waiting = set(grid.push_messages(messages)) - {None}
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while waiting and time.monotonic() < deadline:
        time.sleep(_REPLY_POLL_SECONDS)
        pulled = list(grid.pull_messages(waiting))
        replies += pulled
        waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
    return replies


class FedLoraStrategy(Strategy):
    """Per-client tasks and replica catch-up for a :class:`Federation`; see :meth:`run`."""

    def __init__(self, federation: Federation, *, round_timeout: float, connect_timeout: float):
        self.federation = federation
        self.client_ids = list(federation.client_ids)
        self.round_timeout = round_timeout
        self.connect_timeout = connect_timeout
        #: SuperNode id → the client whose partition it holds
        self.nodes: dict[int, str] = {}
        #: per round: bytes Flower carried each way and the catch-up payload (fp32) within them
        self.transfers: dict[int, dict[str, int]] = {}
        #: the same for the final sync (replies carry no arrays), a Flower-only step the run's
        #: ledger does not count, so both runtimes' ledgers stay equal
        self.sync_transfer = {"bytes_down": 0, "catchup_bytes": 0}
        #: clients whose replica could not be brought up to date by the final sync
        self.sync_failures: list[ClientFailure] = []
        self._asked: set[int] = set()
        self._grid: Grid | None = None
        # the clients' own models (a method keeping factors on them) are evaluated on their nodes
        federation.evaluate_clients = self.evaluate_clients
        self._open: dict[str, str] = {}  # message id → client of the exchange under way
        self._order: list[str] = []  # the round's clients in task order
        self._unsent: list[ClientFailure] = []

    # -- the loop ------------------------------------------------------------------------
    def run(self, grid: Grid) -> dict:
        """Continue the federation to its last round, then bring every replica up to date."""
        self.summary()
        self._grid = grid
        last_round = self.federation.start()
        self.identify_nodes(grid, wait=True)
        for server_round in range(last_round + 1, self.federation.num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", server_round, self.federation.num_rounds)
            messages = self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
            self.aggregate_train(server_round, exchange(grid, messages, self.round_timeout))
            last_round = server_round
        self.synchronize_replicas(grid, last_round)
        return self.report()

    def report(self) -> dict:
        """What the transport saw: traffic per round and in the final sync, replica rounds,
        failed syncs, node map."""
        return {"transfers": {str(r): t for r, t in self.transfers.items()},
                "sync_transfer": dict(self.sync_transfer),
                "replica_round": dict(self.federation.synced),
                "sync_failures": [asdict(f) for f in self.sync_failures],
                "nodes": {cid: node for node, cid in self.nodes.items()}}

    # -- nodes ---------------------------------------------------------------------------
    def identify_nodes(self, grid: Grid, *, wait: bool) -> None:
        """Ask SuperNodes not asked before which partition they hold and how far their replica
        is; with ``wait``, keep looking until every client has a node or ``connect_timeout``."""
        deadline = time.monotonic() + (self.connect_timeout if wait else 0.0)
        while True:
            # waiting, a node that has not answered yet is asked again; between rounds it is
            # not, so a dead node does not cost every round a timeout
            fresh = [node for node in grid.get_node_ids()
                     if node not in self.nodes and (wait or node not in self._asked)]
            self._asked.update(fresh)
            messages = [Message(RecordDict(), dst_node_id=node, message_type=IDENTIFY,
                                ttl=self.round_timeout) for node in fresh]
            timeout = self.round_timeout
            if wait:
                timeout = max(1.0, min(timeout, deadline - time.monotonic()))
            for reply in exchange(grid, messages, timeout):
                self._register(reply)
            if set(self.nodes.values()) >= set(self.client_ids) or time.monotonic() >= deadline:
                break
            time.sleep(_NODE_POLL_SECONDS)
        missing = sorted(set(self.client_ids) - set(self.nodes.values()))
        if missing and wait:
            log(WARNING, "no SuperNode holds the partitions of clients %s", missing)

    def _register(self, reply: Message) -> None:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %s did not identify itself: %s", node, reply.error.reason)
            return
        try:
            partition, replica_round = decode_node_state(reply.content)
        except CodecError as error:
            log(WARNING, "node %s: %s", node, error)
            return
        if not 0 <= partition < len(self.client_ids):
            log(WARNING, "node %s holds partition %s but there are %s clients", node, partition,
                len(self.client_ids))
            return
        client = self.client_ids[partition]
        # a restarted SuperNode comes back under a new id: it replaces the old one
        self.nodes = {n: c for n, c in self.nodes.items() if c != client}
        self.nodes[node] = client
        self.federation.replica_through(client, replica_round)

    def _node_of(self, client_id: str) -> int | None:
        return next((node for node, cid in self.nodes.items() if cid == client_id), None)

    def _catchup(self, client_id: str, through: int) -> Catchup:
        return Catchup(since=self.federation.synced[client_id], through=through,
                       updates=tuple(self.federation.catchup(client_id, through)))

    # -- Strategy ------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One train message per sampled client; ``arrays`` and ``config`` are unused (every
        client's instructions are its own)."""
        self._grid = grid
        self.identify_nodes(grid, wait=False)
        tasks = self.federation.configure_train(server_round)
        self._order = [task.client_id for task in tasks]
        self._open, self._unsent = {}, []
        transfer = self.transfers[server_round] = {"bytes_down": 0, "bytes_up": 0, "catchup_bytes": 0}
        messages = []
        for task in tasks:
            node = self._node_of(task.client_id)
            if node is None:
                self._unsent.append(ClientFailure(task.client_id, server_round,
                                                  "no SuperNode holds this client's partition"))
                continue
            catchup = self._catchup(task.client_id, server_round - 1)
            content = encode_task(task, catchup)
            self._count_sent(transfer, content, task.client_id, catchup.through)
            message = Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                              group_id=str(server_round), ttl=self.round_timeout)
            self._open[message.object_id] = task.client_id
            messages.append(message)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode replies in task order, record failures and rejections, and let the Federation
        aggregate."""
        results, failures, refused, replica_rounds = {}, list(self._unsent), [], {}
        for client, reply in self._match(replies):
            if reply.has_error():  # the node or the SuperLink could not run the task
                failures.append(ClientFailure(client, server_round, _error_reason(reply)))
                continue
            try:
                result, replica_round = decode_result(reply.content)
                if result.update.client_id != client:
                    raise CodecError(f"answered as client {result.update.client_id!r}")
                self._check_fresh(client, server_round, reply.content)
                if replica_round != server_round - 1:  # where this round's catch-up took it
                    raise CodecError(f"replica-round {replica_round}: the task's catch-up merges its replica "
                                     f"through round {server_round - 1}")
            except CodecError as error:
                refused.append(AggregationError(str(error), client_id=client, rule="record"))
                continue
            except AggregationError as error:
                refused.append(error)
                continue
            self.transfers[server_round]["bytes_up"] += wire_bytes(reply.content)
            replica_rounds[client] = replica_round
            results[client] = result
        failures += [ClientFailure(client, server_round, f"no reply within {self.round_timeout:g} s")
                     for client in self._open.values()]
        self._open = {}
        # task order, as the in-process runtime (the metrics list clients in it); each result
        # is let go of once the Federation has added it to the aggregate
        ordered = (results.pop(cid) for cid in self._order if cid in results)
        failures.sort(key=lambda failure: self._order.index(failure.client_id))
        refused.sort(key=lambda error: self._order.index(error.client_id))
        row = self.federation.aggregate_train(server_round, ordered, failures, refused)
        for client, replica_round in replica_rounds.items():  # after the ledger charged the catch-up
            self.federation.replica_through(client, replica_round)
        return None, MetricRecord({k: v for k, v in row.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def _check_fresh(self, client: str, server_round: int, content: RecordDict) -> None:
        """A client's update must not repeat one it sent in an earlier round, in whatever order
        its arrays come (an array's Flower object id is the hash of its dtype, shape and bytes).
        Two clients may send the same factors in one round: a factor no step has moved yet
        (FedSA-LoRA's A in a first step, while B is still zero) is the start they share."""
        arrays = content.array_records[UPDATE_KEY]
        digest = hashlib.sha256(json.dumps([client, sorted((key, array.object_id) for key, array in arrays.items())])
                                .encode()).hexdigest()
        # digest → round, checkpointed with the Federation: a resumed server still knows them
        received = self.federation.runtime_state.setdefault("received_updates", {})
        if digest in received:
            raise AggregationError(f"update identical to the one it sent in round {received[digest]}",
                                   client_id=client, rule="replay")
        received[digest] = server_round

    def _match(self, replies: Iterable[Message]) -> Iterable[tuple[str, Message]]:
        """(client, reply) for replies to the open exchange; stale replies are dropped."""
        for reply in replies:
            client = self._open.pop(reply.metadata.reply_to_message_id, None)
            if client is not None:
                yield client, reply

    def evaluate_clients(self, server_round: int, adapters: dict[str, dict[str, LoraFactors]]) -> dict[str, dict]:
        """The Federation's ``evaluate_clients``: each client's node evaluates the client's own
        model (the adapter completed with the factors it keeps) on the run's test data; a client
        whose node is unknown or does not answer is left out, with a warning. The requests'
        bytes go to the round's ``evaluation_bytes_down``, which the ledger leaves out."""
        kept = self.federation.aggregator.kept_on_client
        transfer = self.transfers.setdefault(server_round, {})
        transfer.setdefault("evaluation_bytes_down", 0)
        self._open, messages = {}, []
        for client, adapter in adapters.items():
            node = self._node_of(client)
            if node is None:
                log(WARNING, "round %s: no SuperNode holds client %s to evaluate its model", server_round, client)
                continue
            content = encode_evaluation(client, server_round, adapter, kept, self._catchup(client, server_round))
            transfer["evaluation_bytes_down"] += wire_bytes(content)
            message = Message(content, dst_node_id=node, message_type=EVALUATE, ttl=self.round_timeout)
            self._open[message.object_id] = client
            messages.append(message)
        metrics = {}
        for client, reply in self._match(exchange(self._grid, messages, self.round_timeout)):
            try:
                metrics[client] = decode_metrics(_content(reply))
            except CodecError as error:
                log(WARNING, "round %s: client %s was not evaluated: %s", server_round, client, error)
        for client in self._open.values():
            log(WARNING, "round %s: client %s was not evaluated within %g s", server_round, client,
                self.round_timeout)
        self._open = {}
        return metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No Flower evaluation round: the Federation evaluates in its own round (asking
        :meth:`evaluate_clients` for models only the clients hold)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(INFO, "\t├──> %s clients, %s rounds", len(self.client_ids), self.federation.num_rounds)
        log(INFO, "\t└──> round timeout %g s, connect timeout %g s", self.round_timeout,
            self.connect_timeout)

    def _count_sent(self, transfer: dict[str, int], content: RecordDict, client_id: str, through: int) -> None:
        """Add a message to the server's traffic: the bytes Flower carries, and the catch-up
        within them as the Federation's ledger counts it (before the replica reports it merged)."""
        transfer["bytes_down"] += wire_bytes(content)
        transfer["catchup_bytes"] += BYTES_PER_PARAM * self.federation.catchup_params(client_id, through)

    # -- final sync ----------------------------------------------------------------------
    def synchronize_replicas(self, grid: Grid, last_round: int) -> None:
        """Send every identified node the base updates it lacks so that, at the end, every
        replica equals the server's model; nodes that do not confirm go to ``sync_failures``."""
        self._open = {}
        messages = []
        for node, client in self.nodes.items():
            content = RecordDict()
            catchup = self._catchup(client, last_round)
            put_catchup(content, catchup)
            message = Message(content, dst_node_id=node, message_type=SYNC, ttl=self.round_timeout)
            self._open[message.object_id] = client
            self._count_sent(self.sync_transfer, content, client, catchup.through)
            messages.append(message)
        for client, reply in self._match(exchange(grid, messages, self.round_timeout)):
            try:
                _, replica_round = decode_node_state(_content(reply))
                self.federation.replica_through(client, replica_round)
            except CodecError as error:
                self.sync_failures.append(ClientFailure(client, last_round, f"sync failed: {error}"))
        self.sync_failures += [ClientFailure(client, last_round,
                                             f"sync: no reply within {self.round_timeout:g} s")
                               for client in self._open.values()]
        self._open = {}


def _error_reason(reply: Message) -> str:
    return f"error reply ({reply.error.code}): {reply.error.reason}"


def _content(reply: Message) -> RecordDict:
    """The reply's content; a CodecError carrying the reason where the reply is an error."""
    if reply.has_error():
        raise CodecError(_error_reason(reply))
    return reply.content
