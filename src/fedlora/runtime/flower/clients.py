"""The clients as the ServerApp reaches them over a Flower Grid.

Which SuperNode holds each client (learned by an ``identify`` query: partition ``p`` holds
``client_ids[p]``), how far its replica of the base model is merged (as the node says), the
base merges it lacks (the run folder's base log, one file per round, written as the
Federation applies them), and the evaluation of a personalised client's own model on its node:
the :class:`~fedlora.engine.personalisation.ClientModels` of a Flower run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from logging import WARNING
from pathlib import Path

from flwr.app import Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedlora.aggregation import AggregationError, LoraFactors
from fedlora.engine.update_log import UpdateLog
from fedlora.runtime.flower.wire import EVALUATE_ACTION, IDENTIFY_ACTION, UPDATE_KEY, Catchup, CodecError, \
    decode_metrics, decode_node_state, encode_evaluation, wire_bytes

IDENTIFY = f"{MessageType.QUERY}.{IDENTIFY_ACTION}"
EVALUATE = f"{MessageType.QUERY}.{EVALUATE_ACTION}"
#: the run folder's log of base merges, for replicas to catch up from
BASE_LOG_DIR = "base-log"
#: seconds between looks for SuperNodes that have not connected yet
_NODE_POLL_SECONDS = 1.0
#: seconds between pulls for replies (Grid.send_and_receive waits 3 s between pulls)
_REPLY_POLL_SECONDS = 0.25

Adapter = dict[str, LoraFactors] | None


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


def error_reason(reply: Message) -> str:
    return f"error reply ({reply.error.code}): {reply.error.reason}"


def reply_content(reply: Message) -> RecordDict:
    """The reply's content; a CodecError carrying the reason where the reply is an error."""
    if reply.has_error():
        raise CodecError(error_reason(reply))
    return reply.content


class ReceivedUpdates:
    """Digests of every update received, by client: a reply repeating an earlier one is a replay.
    A part of the run's checkpointed state, so a resumed server still knows them."""

    def __init__(self) -> None:
        self.rounds: dict[str, int] = {}  # digest → the round it came in

    def check(self, client: str, server_round: int, content: RecordDict) -> None:
        """A client's update must not repeat one it sent in an earlier round, in whatever order
        its arrays come (an array's Flower object id is the hash of its dtype, shape and bytes).
        Two clients may send the same factors in one round: a factor no step has moved yet
        (an uploaded A in a first step, while the B a client keeps is still zero) is the start
        they share."""
        arrays = content.array_records[UPDATE_KEY]
        digest = hashlib.sha256(json.dumps([client, sorted((key, array.object_id) for key, array in arrays.items())])
                                .encode()).hexdigest()
        if digest in self.rounds:
            raise AggregationError(f"update identical to the one it sent in round {self.rounds[digest]}",
                                   client_id=client, rule="replay")
        self.rounds[digest] = server_round

    def state_dict(self) -> tuple[dict, dict]:
        return {"received_updates": self.rounds}, {}

    def load_state_dict(self, state: tuple[dict | None, dict]) -> None:
        self.rounds = dict((state[0] or {}).get("received_updates", {}))


class FlowerClients:
    """Nodes, replicas and the base log of one ServerApp run (see the module docstring)."""

    def __init__(self, grid: Grid, run_dir: Path | str, *, round_timeout: float, connect_timeout: float):
        self.grid = grid
        self.base_log = UpdateLog(Path(run_dir) / BASE_LOG_DIR)
        self.round_timeout = round_timeout
        self.connect_timeout = connect_timeout
        #: SuperNode id → the client whose partition it holds
        self.nodes: dict[int, str] = {}
        #: client → the round its replica is merged through, as its node last said (or as the
        #: catch-up it last took leaves it)
        self.replica_round: dict[str, int] = {}
        #: bytes of the requests to evaluate clients' own models, by round (not in the ledger)
        self.evaluation_bytes: dict[int, int] = {}
        self._asked: set[int] = set()

    # -- nodes ---------------------------------------------------------------------------
    def identify(self, client_ids: list[str], *, wait: bool, reported: Callable[[str, int], None]) -> None:
        """Ask SuperNodes not asked before which partition they hold and how far their replica
        is (each told to ``reported(client, round)`` too); with ``wait``, keep looking until
        every client has a node or ``connect_timeout``."""
        deadline = time.monotonic() + (self.connect_timeout if wait else 0.0)
        while True:
            # waiting, a node that has not answered yet is asked again; between rounds it is
            # not, so a dead node does not cost every round a timeout
            fresh = [node for node in self.grid.get_node_ids()
                     if node not in self.nodes and (wait or node not in self._asked)]
            self._asked.update(fresh)
            messages = [Message(RecordDict(), dst_node_id=node, message_type=IDENTIFY,
                                ttl=self.round_timeout) for node in fresh]
            timeout = self.round_timeout
            if wait:
                timeout = max(1.0, min(timeout, deadline - time.monotonic()))
            for reply in exchange(self.grid, messages, timeout):
                self._register(reply, client_ids, reported)
            if set(self.nodes.values()) >= set(client_ids) or time.monotonic() >= deadline:
                break
            time.sleep(_NODE_POLL_SECONDS)
        missing = sorted(set(client_ids) - set(self.nodes.values()))
        if missing and wait:
            log(WARNING, "no SuperNode holds the partitions of clients %s", missing)

    def _register(self, reply: Message, client_ids: list[str], reported: Callable[[str, int], None]) -> None:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %s did not identify itself: %s", node, reply.error.reason)
            return
        try:
            partition, replica_round = decode_node_state(reply.content)
        except CodecError as error:
            log(WARNING, "node %s: %s", node, error)
            return
        if not 0 <= partition < len(client_ids):
            log(WARNING, "node %s holds partition %s but there are %s clients", node, partition, len(client_ids))
            return
        client = client_ids[partition]
        # a restarted SuperNode comes back under a new id: it replaces the old one
        self.nodes = {n: c for n, c in self.nodes.items() if c != client}
        self.nodes[node] = client
        self.replica_round[client] = replica_round
        reported(client, replica_round)

    def node_of(self, client_id: str) -> int | None:
        return next((node for node, cid in self.nodes.items() if cid == client_id), None)

    # -- replicas ------------------------------------------------------------------------
    def catchup(self, client_id: str, through: int) -> Catchup:
        """The base merges ``client_id``'s replica lacks to be merged through round ``through``."""
        since = self.replica_round.get(client_id, 0)
        return Catchup(since=since, through=through,
                       updates=tuple((r, self.base_log.load(r)) for r in self.base_log.rounds() if since < r <= through))

    def forget_after(self, server_round: int) -> None:
        """Drop the merges logged after ``server_round``: a resumed run redoes those rounds."""
        self.base_log.delete(r for r in self.base_log.rounds() if r > server_round)

    # -- the clients' own models ---------------------------------------------------------
    def evaluate(self, server_round: int, adapters: dict[str, Adapter], kept: frozenset[str],
                 evaluate_here: Callable[[Adapter], dict]) -> dict[str, dict]:
        """Each client's node evaluates the client's own model (the adapter completed with the
        factors it keeps) on the run's test data; a client without an adapter has the base
        model, evaluated here. A client whose node is unknown or does not answer is left out,
        with a warning."""
        metrics = {cid: evaluate_here(None) for cid, adapter in adapters.items() if adapter is None}
        open_messages, messages = {}, []
        for client, adapter in adapters.items():
            node = self.node_of(client)
            if adapter is None:
                continue
            if node is None:
                log(WARNING, "round %s: no SuperNode holds client %s to evaluate its model", server_round, client)
                continue
            content = encode_evaluation(client, server_round, adapter, kept, self.catchup(client, server_round))
            self.evaluation_bytes[server_round] = self.evaluation_bytes.get(server_round, 0) + wire_bytes(content)
            message = Message(content, dst_node_id=node, message_type=EVALUATE, ttl=self.round_timeout)
            open_messages[message.object_id] = client
            messages.append(message)
        for client, reply in matched(open_messages, exchange(self.grid, messages, self.round_timeout)):
            try:
                metrics[client] = decode_metrics(reply_content(reply))
            except CodecError as error:
                log(WARNING, "round %s: client %s was not evaluated: %s", server_round, client, error)
        for client in open_messages.values():
            log(WARNING, "round %s: client %s was not evaluated within %g s", server_round, client, self.round_timeout)
        return {cid: metrics[cid] for cid in adapters if cid in metrics}


def matched(open_messages: dict[str, str], replies: Iterable[Message]) -> Iterable[tuple[str, Message]]:
    """(client, reply) for replies to ``open_messages`` (message id → client), which it empties
    of each; stale replies are dropped."""
    for reply in replies:
        client = open_messages.pop(reply.metadata.reply_to_message_id, None)
        if client is not None:
            yield client, reply
