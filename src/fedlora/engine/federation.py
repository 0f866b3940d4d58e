"""The server side of the round loop, independent of how messages travel.

A runtime (in-process or Flower) asks :meth:`Federation.configure_train` for the round's
client tasks, delivers them, and hands the answers to :meth:`Federation.aggregate_train`,
which validates, aggregates, updates the global model, evaluates, accounts and checkpoints.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from torch import nn

from fedlora.aggregation import Accumulator, AggregationError, ClientUpdate, GlobalUpdate, LoraFactors, RunContext, \
    get_aggregator
from fedlora.aggregation.base import FACTOR_NAMES
from fedlora.aggregation.error import FactoredSum, relative_error
from fedlora.aggregation.validation import validate_update
from fedlora.engine.checkpoint import load_latest_checkpoint, save_checkpoint, with_prefix
from fedlora.engine.config import RunConfig
from fedlora.engine.global_model import GlobalModel
from fedlora.engine.ledger import Ledger, factor_params
from fedlora.engine.metrics import append_metrics, rewrite_metrics
from fedlora.engine.privacy import run_privacy
from fedlora.engine.seeding import derive_seed
from fedlora.engine.task import ClientResult, ClientTask
from fedlora.engine.update_log import UpdateLog
from fedlora.lora import base_weight

#: the run folder's log of base merges, kept for runtimes with replicas (Flower)
BASE_LOG_DIR = "base-log"
BOTH_FACTORS = frozenset(FACTOR_NAMES)

Evaluate = Callable[[nn.Module, int], dict]
EvaluateClients = Callable[[int, dict[str, dict[str, LoraFactors]]], dict[str, dict]]


@dataclass(frozen=True)
class Contribution:
    """What a round keeps of an accepted reply once its factors are in the aggregate (the start
    it was sent is the server's own: the aggregation error subtracts it)."""

    client_id: str
    num_examples: int
    train_loss: float | None
    seconds: float
    start: dict[str, LoraFactors] | None


@dataclass
class ClientFailure:
    """A sampled client that did not deliver a usable update this round."""

    client_id: str
    server_round: int
    reason: str


def received(update: ClientUpdate, task: ClientTask) -> ClientUpdate:
    """The update as the server has it: the factors the client uploads, the others those of the
    start it was sent (a frozen factor, or the stand-in for one the client keeps), whatever the
    reply held in their place (the Flower codec sends only the uploads)."""
    withheld = BOTH_FACTORS - task.uploads
    if not withheld:
        return update
    factors = {module: replace(f, **{name: getattr(task.start[module], name).to(getattr(f, name).device)
                                     for name in withheld})
               if module in task.start else f  # a module not asked for: validation names it
               for module, f in update.factors.items()}
    return replace(update, factors=factors)


class Federation:
    """Round state of one run: sampling, the global model, the ledger and the metrics rows."""

    def __init__(self, config: RunConfig, client_sizes: dict[str, int | None], global_model: GlobalModel,
                 evaluate: Evaluate, run_dir: Path | str, *, keep_base_log: bool = False,
                 log: Callable[[str], None] = lambda message: None):
        self.config = config
        self.client_sizes = dict(client_sizes)
        self.client_ids = list(client_sizes)
        self.ranks = {cid: config.rank_of(i) for i, cid in enumerate(self.client_ids)}
        self.global_model = global_model
        self.evaluate_model = evaluate
        self.run_dir = Path(run_dir)
        self.log = log
        self.shapes = {m: tuple(base_weight(global_model.model, m).shape) for m in global_model.adapted_modules}
        self.aggregator = get_aggregator(config.method, **config.method_options)
        #: differential privacy: σ calibrated from the planned schedule, each client's (ε, δ)
        self.privacy = run_privacy(config, self.client_sizes, self.sample, self.local_steps)
        if self.privacy is not None:
            self.aggregator = self.privacy.wrap(self.aggregator, config.sampled_per_round(len(self.client_ids)))
        self.aggregator.setup(RunContext(
            ranks=dict(self.ranks), scales={cid: config.scale_for(rank) for cid, rank in self.ranks.items()},
            shapes=dict(self.shapes), seed=config.seed))
        #: last round whose base merge each client's replica has applied: the one record of
        #: replica progress (a runtime with real replicas reports it, see :meth:`replica_through`)
        self.synced = {cid: 0 for cid in self.client_ids}
        #: base merges by round: parameter counts always; the factors, when replicas need them,
        #: on disk (a restarted replica may need every round; memory and checkpoints need none)
        self.base_log_params: dict[int, int] = {}
        self.base_log = UpdateLog(self.run_dir / BASE_LOG_DIR) if keep_base_log else None
        self.ledger = Ledger(global_model.total_params())
        self.rows: list[dict] = []
        self.completed_round = 0
        #: (round, {client: its adapter as the server has it}) → {client: metrics}: set by the
        #: runtime holding the clients where a method keeps factors on them (see :meth:`evaluate`)
        self.evaluate_clients: EvaluateClients | None = None
        #: what the runtime driving the federation must keep across a resume (JSON; the Flower
        #: strategy's digests of the updates it received), saved with every checkpoint
        self.runtime_state: dict = {}
        self._tasks: dict[str, ClientTask] = {}
        self._round_started = time.perf_counter()

    @property
    def num_rounds(self) -> int:
        return self.config.rounds

    # -- configure ------------------------------------------------------------------------
    def sample(self, server_round: int) -> list[str]:
        count = self.config.sampled_per_round(len(self.client_ids))
        rng = random.Random(derive_seed(self.config.seed, "sample", server_round))
        chosen = set(rng.sample(self.client_ids, count))
        return [cid for cid in self.client_ids if cid in chosen]

    def local_steps(self, client_id: str) -> int:
        if self.config.local_steps is not None:
            return self.config.local_steps
        per_step = self.config.batch_size * self.config.grad_accum
        return max(1, math.ceil(self.config.local_epochs * self.client_sizes[client_id] / per_step))

    def configure_train(self, server_round: int) -> list[ClientTask]:
        self._round_started = time.perf_counter()
        method = self.aggregator
        trainable, uploads, kept = method.trainable(server_round), method.uploads(server_round), method.kept_on_client
        if kept & uploads:
            raise RuntimeError(f"method {self.config.method!r} uploads {sorted(kept & uploads)}, which its "
                               "clients keep and never send")
        init_seed = derive_seed(self.config.seed, "init", server_round)
        self._tasks = {}
        for cid in self.sample(server_round):
            rank = method.client_rank(cid, server_round)
            start = method.start_adapter(cid, server_round)
            if start is None and (uploads != BOTH_FACTORS or kept):
                raise RuntimeError(f"method {self.config.method!r} gives client {cid!r} no start adapter; the "
                                   "server takes the factors clients do not send from it")
            self._tasks[cid] = ClientTask(
                client_id=cid, server_round=server_round, rank=rank, alpha=self.config.alpha_for(rank),
                trainable=trainable, init_seed=init_seed,
                data_seed=derive_seed(self.config.seed, "data", server_round, cid),
                local_steps=self.local_steps(cid), start=start, uploads=uploads, kept=kept,
                **(self.privacy.task_options(cid, server_round) if self.privacy else {}))
        if self.privacy is not None:
            self.privacy.account(self._tasks.values())
        return list(self._tasks.values())

    def replica_through(self, client_id: str, last_round: int) -> None:
        """A runtime with real replicas (Flower) reports how far ``client_id``'s has merged, as the
        replica itself said: after a ``--resume`` or a SuperNode restart a replica can be further
        behind than this server thinks, and the catch-up and the ledger follow what it said."""
        self.synced[client_id] = last_round

    def base_updates_since(self, last_round: int, through: int | None = None) -> list[tuple[int, GlobalUpdate]]:
        """Base merges after ``last_round`` (through round ``through``, when given), oldest first."""
        if self.base_log is None:
            raise RuntimeError("this Federation keeps no base log (keep_base_log=False)")
        return [(r, self.base_log.load(r)) for r in sorted(self.base_log_params)
                if last_round < r <= (through if through is not None else r)]

    def catchup(self, client_id: str, through: int) -> list[tuple[int, GlobalUpdate]]:
        """The base merges ``client_id``'s replica lacks to be merged through round ``through``."""
        return self.base_updates_since(self.synced[client_id], through)

    def catchup_params(self, client_id: str, through: int) -> int:
        """Parameters in :meth:`catchup`: what a client downloads besides its start adapter."""
        return sum(p for r, p in self.base_log_params.items() if self.synced[client_id] < r <= through)

    # -- aggregate ------------------------------------------------------------------------
    def _check(self, result: ClientResult, task: ClientTask | None) -> None:
        update = result.update
        if task is None:
            raise AggregationError("sent an update it was not asked for", client_id=update.client_id,
                                   rule="unexpected")
        validate_update(update, self.shapes, max_norm=self.config.max_update_norm,
                        max_examples=self.config.max_examples)
        expected_scale = self.config.scale_for(task.rank)
        for module, factors in update.factors.items():
            if not math.isclose(factors.scale, expected_scale, rel_tol=1e-6):
                raise AggregationError(f"scale {factors.scale:g} differs from the assigned α/r = {expected_scale:g}",
                                       client_id=update.client_id, module=module, rule="scale")
            if factors.rank != task.rank:
                raise AggregationError(f"rank {factors.rank} differs from the assigned {task.rank}",
                                       client_id=update.client_id, module=module, rule="shape")

    def aggregate_train(self, server_round: int, results: Iterable[ClientResult],
                        failures: Sequence[ClientFailure] = (), refused: Sequence[AggregationError] = ()) -> dict:
        """Validate, account and aggregate the round's replies, then update, evaluate and save.

        ``results`` may be a generator (the in-process runtime trains each client as it is
        drawn): each reply is checked and added to the aggregate, and dropped here, before
        the next is drawn. Updates are aggregated in task order, whatever order they come in.
        ``refused`` are replies the runtime rejected before they became results (Flower: ones
        it cannot decode, or replayed); they are recorded with the others' rejections.
        """
        tasks, self._tasks = self._tasks, {}
        accumulator = self.aggregator.accumulator(
            [(cid, dict.fromkeys(self.shapes, task.rank)) for cid, task in tasks.items()])
        rejected: list[dict] = []
        accepted: list[Contribution] = []
        server_seconds = 0.0

        def reject(error: AggregationError) -> None:
            rejected.append({"client_id": error.client_id, "module": error.module, "rule": error.rule,
                             "reason": str(error)})
            self.log(f"round {server_round}: rejected update: {error}")

        for error in refused:
            reject(error)
        for result in results:
            started = time.perf_counter()
            cid = result.update.client_id
            task = tasks.pop(cid, None)  # None for a client not asked, or asked and already answered
            try:
                if task is not None:
                    self._account(server_round, task, result)
                    result = replace(result, update=received(result.update, task))
                self._check(result, task)
                accumulator.add(result.update)
                accepted.append(Contribution(cid, result.update.num_examples, result.train_loss, result.seconds,
                                             task.start))
            except AggregationError as error:
                reject(error)
            del result  # the accumulator holds what it needs of the upload
            server_seconds += time.perf_counter() - started
        for failure in failures:
            self.log(f"round {server_round}: client {failure.client_id} failed: {failure.reason}")
        started = time.perf_counter()
        before = self.aggregator.evaluation_adapters()
        update = self._aggregate(server_round, accumulator, accepted, reject)
        skipped = update is None
        errors = {}
        if skipped:
            self.log(f"round {server_round}: only {len(accepted)} usable updates (< min_clients "
                     f"{self.config.min_clients}); round skipped, global model kept")
        else:
            self._apply(server_round, update)
            errors = self._errors(server_round, before, update, accepted, accumulator)
        server_seconds += time.perf_counter() - started
        reported = [c for c in accepted if c.train_loss is not None]  # DP-SGD clients withhold theirs
        examples = sum(c.num_examples for c in reported)
        row = {
            "round": server_round, "method": self.config.method,
            "clients": [c.client_id for c in accepted],
            "train_loss": sum(c.train_loss * c.num_examples for c in reported) / examples if reported else None,
            **self.ledger.round_totals(server_round),
            "client_seconds": sum(c.seconds for c in accepted), "server_seconds": server_seconds,
            "rejected": rejected, "failures": [asdict(f) for f in failures], "skipped": skipped,
            **errors, **(dict(update.info) if not skipped else {}),
        }
        return self._finish_round(server_round, row)

    def _aggregate(self, server_round: int, accumulator: Accumulator, accepted: list[Contribution],
                   reject: Callable[[AggregationError], None]) -> GlobalUpdate | None:
        """Aggregate the accepted updates; a client the method itself refuses (e.g. a frozen
        factor unlike the others') is rejected and the rest aggregated. None: too few left."""
        while len(accepted) >= self.config.min_clients:
            try:
                return accumulator.result(server_round=server_round)
            except AggregationError as error:
                culprit = [c for c in accepted if c.client_id == error.client_id]
                if not culprit:
                    raise
                reject(error)
                accepted.remove(culprit[0])
                accumulator.drop(error.client_id)
        return None

    def _account(self, server_round: int, task: ClientTask, reply: ClientResult) -> None:
        """The ledger row of a client that replied (accepted or not): it downloaded the merges
        it had missed plus its start adapter but for the factors it keeps itself, and uploaded
        the factors the method has it send. A client that
        never replied is not known to have received anything and stays where it was."""
        cid = task.client_id
        self.ledger.record(server_round, cid, factor_params(reply.update.factors, task.uploads),
                           self.catchup_params(cid, server_round - 1)
                           + factor_params(task.start, BOTH_FACTORS - task.kept))
        self.synced[cid] = server_round - 1

    def _apply(self, server_round: int, update: GlobalUpdate) -> None:
        self.global_model.apply(update)
        base_part = GlobalUpdate(factors=update.factors if update.merge else {}, merge=update.merge,
                                 residual=update.residual)
        params = factor_params(base_part.factors) + factor_params(base_part.residual)
        if params:
            self.base_log_params[server_round] = params
            if self.base_log is not None:
                self.base_log.write(server_round, base_part)
        self.aggregator.commit(server_round, update)

    def _errors(self, server_round: int, before: dict, update: GlobalUpdate, accepted: list[Contribution],
                accumulator: Accumulator) -> dict[str, float | None]:
        """The round's ``aggregation_error`` and ``broadcast_error`` (see
        :mod:`fedlora.aggregation.error`), against the example-weighted average of the aggregated
        clients' changes: what they uploaded (the accumulator's ``Σ p_k s_k B_k A_k``) minus
        where they started.
        A method whose clients keep models of their own has no global model to compare: both
        are None."""
        after = self.aggregator.evaluation_adapters()
        if list(before) != [None] or list(after) != [None]:
            return {"aggregation_error": None, "broadcast_error": None}
        total = sum(c.num_examples for c in accepted)
        exact = FactoredSum().add(accumulator.exact_sum())
        for contribution in accepted:
            exact.add(contribution.start, -contribution.num_examples / total)
        achieved = (FactoredSum().add(update.factors if update.merge else None).add(update.residual)
                    .add(after[None]).add(before[None], -1.0))
        return {"aggregation_error": relative_error(achieved, exact),
                "broadcast_error": self._broadcast_error(server_round + 1, after[None])}

    def _broadcast_error(self, next_round: int, adapter: dict[str, LoraFactors] | None) -> float | None:
        """How far the adapters clients would start ``next_round`` from are from the global
        ``adapter``, example-weighted over every client (uniformly where sizes are unknown)."""
        sizes = (self.client_sizes if None not in self.client_sizes.values()
                 else dict.fromkeys(self.client_sizes, 1))
        weighted = 0.0
        for cid, size in sizes.items():
            start = self.aggregator.start_adapter(cid, next_round)
            error = relative_error(FactoredSum().add(start), FactoredSum().add(adapter))
            if error is None:
                return None
            weighted += size * error
        return weighted / sum(sizes.values())

    # -- evaluate, record, checkpoint -----------------------------------------------------
    def evaluate(self, server_round: int) -> dict:
        """The method's global model, or, for a method whose clients keep models of their own,
        each client's and their mean. Where the method keeps factors on the clients, their
        models are completed and evaluated by the runtime that holds them
        (:attr:`evaluate_clients`); a client it could not evaluate is left out of the mean."""
        adapters = self.aggregator.evaluation_adapters()
        if list(adapters) == [None]:
            return self.evaluate_adapter(adapters[None], server_round)
        held = {cid: adapter for cid, adapter in adapters.items()
                if adapter is not None and self.aggregator.kept_on_client}
        if held and self.evaluate_clients is None:
            raise RuntimeError(f"method {self.config.method!r} keeps factors on the clients and no runtime "
                               "evaluates the clients' models (Federation.evaluate_clients is unset)")
        remote = self.evaluate_clients(server_round, held) if held else {}
        per_client = {cid: remote[cid] if cid in held else self.evaluate_adapter(adapter, server_round)
                      for cid, adapter in adapters.items() if cid in remote or cid not in held}
        if not per_client:
            return {}
        numeric = [key for key, value in next(iter(per_client.values())).items()
                   if isinstance(value, (int, float))]
        means = {key: sum(m[key] for m in per_client.values()) / len(per_client) for key in numeric}
        return {**means, "per_client": per_client}

    def evaluate_adapter(self, adapter: dict[str, LoraFactors] | None, server_round: int) -> dict:
        """The global model with ``adapter`` merged in (None: as it is), evaluated."""
        with self.global_model.with_adapter(adapter) as model:
            return self.evaluate_model(model, server_round)

    def start(self) -> int:
        """Evaluate round 0 unless resuming; returns the last completed round."""
        restored = self.restore()
        if self.base_log is not None:  # rounds logged after the checkpoint are redone
            self.base_log.delete(set(self.base_log.rounds()) - set(self.base_log_params))
        if restored is None:
            row = {"round": 0, "method": self.config.method, "clients": [], "train_loss": None,
                   "bytes_up": 0, "bytes_down": 0, "params_up": 0, "params_down": 0,
                   "client_seconds": 0.0, "server_seconds": 0.0, "rejected": [], "failures": [],
                   "skipped": False}
            self._finish_round(0, row)
        return self.completed_round

    def _finish_round(self, server_round: int, row: dict) -> dict:
        evaluated = time.perf_counter()
        row.update(self.evaluate(server_round))
        if self.privacy is not None:
            row.update(self.privacy.row())
        row["eval_seconds"] = time.perf_counter() - evaluated
        row["seconds"] = time.perf_counter() - (self._round_started if server_round else evaluated)
        self.rows.append(row)
        self.completed_round = server_round
        self.save()
        append_metrics(self.run_dir, row)
        return row

    def summary(self) -> dict:
        return {"method": self.config.method, "rounds": self.completed_round,
                "final": self.rows[-1] if self.rows else None,
                "communication": self.ledger.summary(),
                "best_eval_loss": min((r["eval_loss"] for r in self.rows if r.get("eval_loss") is not None),
                                      default=None),
                **(self.privacy.summary() if self.privacy is not None else {})}

    def save(self) -> None:
        tensors = {f"base/{name}": w for name, w in self.global_model.adapted_weights().items()}
        tensors.update({f"carry/{name}": c for name, c in self.global_model.carry.items()})
        method_meta, method_tensors = self.aggregator.state_dict()
        tensors.update({f"method/{key}": tensor for key, tensor in method_tensors.items()})
        state = {"completed_round": self.completed_round, "rows": self.rows,
                 "ledger": self.ledger.state_dict(), "synced": self.synced,
                 "base_log_params": {str(r): p for r, p in self.base_log_params.items()},
                 "method": method_meta, "context": asdict(self.aggregator.context),
                 "runtime": self.runtime_state,
                 "privacy": self.privacy.state_dict() if self.privacy is not None else None}
        save_checkpoint(self.run_dir, self.completed_round, state, tensors)

    def restore(self) -> int | None:
        """Load the newest checkpoint of ``run_dir``; None when there is none."""
        loaded = load_latest_checkpoint(self.run_dir, device=self.global_model.device)
        if loaded is None:
            return None
        state, tensors = loaded
        self.global_model.load_adapted_weights(with_prefix("base/", tensors))
        self.global_model.carry = with_prefix("carry/", tensors)
        self.completed_round = state["completed_round"]
        self.rows = state["rows"]
        self.ledger = Ledger.from_state_dict(state["ledger"])
        self.synced = {cid: int(r) for cid, r in state["synced"].items()}
        self.base_log_params = {int(r): p for r, p in state["base_log_params"].items()}
        self.runtime_state = state.get("runtime", {})
        self.aggregator.load_state_dict((state["method"], with_prefix("method/", tensors)))
        if self.privacy is not None:
            self.privacy.load_state_dict(state.get("privacy"))
        rewrite_metrics(self.run_dir, self.rows)
        return self.completed_round
