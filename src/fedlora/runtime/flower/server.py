"""The ServerApp's round loop: fedlora's :class:`Federation` driven over a Flower Grid.

Not a Flower ``Strategy``: a strategy aggregates one ArrayRecord that Flower's loop owns, while
here every sampled client gets its own message (its task, its start, the base merges its
replica lacks), the global model stays the Federation's, and replicas are brought up to date
at the end. Replies are matched to clients by the id of the message they answer, so error
replies the SuperLink makes for an unreachable node are attributed too; missing and failed
replies become :class:`ClientFailure`\\ s and the Federation decides whether enough clients
answered. A reply is bytes from a machine the server does not control: one that does not
decode, or whose update repeats one already received (a replay), is refused here with its rule
(``record``, ``replay``), beside the Federation's own rejections.
"""

from __future__ import annotations

from dataclasses import asdict
from logging import INFO

from flwr.app import Message, MessageType, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode

from fedlora.aggregation import AggregationError
from fedlora.engine.federation import Federation
from fedlora.engine.ledger import BYTES_PER_PARAM
from fedlora.engine.task import ClientFailure
from fedlora.runtime.flower.clients import FlowerClients, ReceivedUpdates, error_reason, exchange, matched, \
    reply_content
from fedlora.runtime.flower.wire import SYNC_ACTION, CodecError, decode_node_state, decode_result, encode_task, \
    put_catchup, wire_bytes

SYNC = f"{MessageType.QUERY}.{SYNC_ACTION}"
#: error replies the SuperLink makes when a message expired unanswered or its node is gone
_UNREACHABLE_CODES = {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE}


class FlowerRounds:
    """Runs ``federation`` to its last round over ``clients``' nodes; see :meth:`run`."""

    def __init__(self, federation: Federation, clients: FlowerClients, received: ReceivedUpdates):
        self.federation = federation
        self.clients = clients
        self.received = received
        self.client_ids = federation.schedule.client_ids
        self.timeout = clients.round_timeout
        #: per round: bytes Flower carried each way and the catch-up payload (fp32) within them
        self.transfers: dict[int, dict[str, int]] = {}
        #: the same for the final sync (replies carry no arrays), a Flower-only step the run's
        #: ledger does not count, so both runtimes' ledgers stay equal
        self.sync_transfer = {"bytes_down": 0, "catchup_bytes": 0}
        #: clients whose replica could not be brought up to date by the final sync
        self.sync_failures: list[ClientFailure] = []
        #: SuperNode → the round whose task it left unanswered, until it answers one again: the
        #: final sync does not wait a timeout on a node that is most likely gone (a client that
        #: comes back does so on a new node)
        self.unreachable: dict[int, int] = {}

    def run(self) -> dict:
        """Continue the federation to its last round, then bring every replica up to date;
        returns what the transport saw."""
        log(INFO, "\t├──> %s clients, %s rounds", len(self.client_ids), self.federation.config.rounds)
        last_round = self.federation.start()
        self.clients.forget_after(last_round)  # merges logged after the checkpoint are redone
        self.clients.identify(self.client_ids, wait=True, reported=self.federation.ledger.replica_through)
        for server_round in range(last_round + 1, self.federation.config.rounds + 1):
            log(INFO, "[ROUND %s/%s]", server_round, self.federation.config.rounds)
            self.round(server_round)
            last_round = server_round
        self.synchronize_replicas(last_round)
        return self.report()

    def report(self) -> dict:
        """Traffic per round and in the final sync, replica rounds, failed syncs, node map."""
        rounds = sorted(set(self.transfers) | set(self.clients.evaluation_bytes))
        transfers = {str(r): {**self.transfers.get(r, {}), **({"evaluation_bytes_down": self.clients.evaluation_bytes[r]}
                                                              if r in self.clients.evaluation_bytes else {})}
                     for r in rounds}
        return {"transfers": transfers, "sync_transfer": dict(self.sync_transfer),
                "replica_round": dict(self.federation.ledger.merged_through),
                "sync_failures": [asdict(f) for f in self.sync_failures],
                "nodes": {cid: node for node, cid in self.clients.nodes.items()}}

    def round(self, server_round: int) -> None:
        """One train message per sampled client, their replies decoded in task order, the
        Federation's aggregation."""
        self.clients.identify(self.client_ids, wait=False, reported=self.federation.ledger.replica_through)
        tasks = self.federation.configure_train(server_round)
        order = [task.client_id for task in tasks]
        transfer = self.transfers[server_round] = {"bytes_down": 0, "bytes_up": 0, "catchup_bytes": 0}
        failures, opened, messages, sent_to = [], {}, [], {}
        for task in tasks:
            node = self.clients.node_of(task.client_id)
            if node is None:
                failures.append(ClientFailure(task.client_id, server_round, "no SuperNode holds this client's partition"))
                continue
            catchup = self.clients.catchup(task.client_id, server_round - 1)
            content = encode_task(task, catchup)
            self._count_sent(transfer, content, task.client_id, catchup.through)
            message = Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round),
                              ttl=self.timeout)
            opened[message.object_id], sent_to[task.client_id] = task.client_id, node
            messages.append(message)
        results, refused, replica_rounds = {}, [], {}
        for client, reply in matched(opened, exchange(self.clients.grid, messages, self.timeout)):
            self.unreachable.pop(sent_to[client], None)
            if reply.has_error():  # the node or the SuperLink could not run the task
                failures.append(ClientFailure(client, server_round, error_reason(reply)))
                if reply.error.code in _UNREACHABLE_CODES:
                    self.unreachable[sent_to[client]] = server_round
                continue
            try:
                result, replica_round = decode_result(reply.content)
                if result.update.client_id != client:
                    raise CodecError(f"answered as client {result.update.client_id!r}")
                self.received.check(client, server_round, reply.content)
                if replica_round != server_round - 1:  # where this round's catch-up took it
                    raise CodecError(f"replica-round {replica_round}: the task's catch-up merges its replica "
                                     f"through round {server_round - 1}")
            except CodecError as error:
                refused.append(AggregationError(str(error), client_id=client, rule="record"))
                continue
            except AggregationError as error:
                refused.append(error)
                continue
            transfer["bytes_up"] += wire_bytes(reply.content)
            self.clients.replica_round[client] = replica_rounds[client] = replica_round
            results[client] = result
        failures += [ClientFailure(client, server_round, f"no reply within {self.timeout:g} s")
                     for client in opened.values()]
        self.unreachable.update({sent_to[client]: server_round for client in opened.values()})
        # task order, as the in-process runtime (the metrics list clients in it); each result
        # is let go of once the Federation has added it to the aggregate
        ordered = (results.pop(cid) for cid in order if cid in results)
        failures.sort(key=lambda failure: order.index(failure.client_id))
        refused.sort(key=lambda error: order.index(error.client_id))
        self.federation.aggregate_train(server_round, ordered, failures, refused)
        for client, replica_round in replica_rounds.items():  # after the ledger charged the catch-up
            self.federation.ledger.replica_through(client, replica_round)

    def _count_sent(self, transfer: dict[str, int], content: RecordDict, client_id: str, through: int) -> None:
        """Add a message to the server's traffic: the bytes Flower carries, and the catch-up
        within them as the Federation's ledger counts it (before the replica reports it merged)."""
        transfer["bytes_down"] += wire_bytes(content)
        transfer["catchup_bytes"] += BYTES_PER_PARAM * self.federation.ledger.catchup_params(client_id, through)

    def synchronize_replicas(self, last_round: int) -> None:
        """Send every identified node the base updates it lacks so that, at the end, every
        replica equals the server's model; nodes that do not confirm go to ``sync_failures``,
        as do those not sent it because their last task went unanswered. A node that came back
        under a new id since the last round is identified first, and synced in its old one's place."""
        self.clients.identify(self.client_ids, wait=False, reported=self.federation.ledger.replica_through)
        opened, messages = {}, []
        for node, client in self.clients.nodes.items():
            if node in self.unreachable:  # its replica catches up from the base log if it takes a task again
                self.sync_failures.append(ClientFailure(
                    client, last_round, f"sync: not sent, its round-{self.unreachable[node]} task went unanswered"))
                continue
            content = RecordDict()
            catchup = self.clients.catchup(client, last_round)
            put_catchup(content, catchup)
            message = Message(content, dst_node_id=node, message_type=SYNC, ttl=self.timeout)
            opened[message.object_id] = client
            self._count_sent(self.sync_transfer, content, client, catchup.through)
            messages.append(message)
        for client, reply in matched(opened, exchange(self.clients.grid, messages, self.timeout)):
            try:
                _, replica_round = decode_node_state(reply_content(reply))
                self.clients.replica_round[client] = replica_round
                self.federation.ledger.replica_through(client, replica_round)
            except CodecError as error:
                self.sync_failures.append(ClientFailure(client, last_round, f"sync failed: {error}"))
        self.sync_failures += [ClientFailure(client, last_round, f"sync: no reply within {self.timeout:g} s")
                               for client in opened.values()]
