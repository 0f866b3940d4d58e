"""The round loop's server side, independent of how messages travel.

A runtime asks :meth:`Federation.configure_train` for a round's tasks, delivers them and hands
the replies to :meth:`Federation.aggregate_train`: through the gate into the method's
accumulator, applied, evaluated, recorded, checkpointed. The runtime gives it, at construction,
where clients' own models are evaluated, what it keeps across a resume, and a hook for merges.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from torch import nn

from fedlora.aggregation import Accumulator, AggregationError, Aggregator, GlobalUpdate, LoraFactors
from fedlora.aggregation.error import round_errors
from fedlora.aggregation.factors import client_weights, example_weights
from fedlora.engine.config import RunConfig
from fedlora.engine.gate import admit
from fedlora.engine.global_model import GlobalModel
from fedlora.engine.ledger import Ledger, factor_params
from fedlora.engine.metrics import append_metrics
from fedlora.engine.personalisation import ClientModels, mean_over_clients
from fedlora.engine.privacy import RunPrivacy
from fedlora.engine.rows import RoundLog, RoundRow
from fedlora.engine.run_state import MethodPart, RunState, Stateful
from fedlora.engine.schedule import Schedule
from fedlora.engine.seeding import derive_seed
from fedlora.engine.task import ClientFailure, ClientResult, ClientTask, Contribution

Evaluate = Callable[[nn.Module, int], dict]


class Federation:
    """The round state of one run: its schedule, method, global model, ledger and rows."""

    def __init__(self, config: RunConfig, schedule: Schedule, global_model: GlobalModel, method: Aggregator,
                 evaluate: Evaluate, run_dir: Path | str, *, privacy: RunPrivacy | None = None,
                 client_models: ClientModels | None = None, runtime_state: Mapping[str, Stateful] = {},
                 on_merge: Callable[[int, GlobalUpdate], None] | None = None,
                 log: Callable[[str], None] = lambda message: None):
        self.config, self.schedule, self.global_model, self.method = config, schedule, global_model, method
        self.evaluate_model, self.client_models, self.privacy = evaluate, client_models, privacy
        self.run_dir, self.on_merge, self.log = Path(run_dir), on_merge, log
        self.shapes = method.context.shapes
        self.ledger = Ledger(global_model.total_params(), schedule.client_ids)
        self.rows = RoundLog(run_dir)
        self.completed_round = 0
        parts = {"model": global_model, "method": MethodPart(method), "ledger": self.ledger, "rows": self.rows,
                 **({"privacy": privacy} if privacy is not None else {}), **runtime_state}
        self.checkpoints = RunState(run_dir, parts, device=global_model.device)
        self._tasks: dict[str, ClientTask] = {}
        self._round_started = time.perf_counter()

    def start(self) -> int:
        """Resume from the newest checkpoint, or evaluate round 0; the last completed round."""
        restored = self.checkpoints.restore()
        if restored is None:
            self._finish_round(RoundRow(0, self.config.method))
        self.completed_round = self.rows[-1].round
        return self.completed_round

    def configure_train(self, server_round: int) -> list[ClientTask]:
        self._round_started = time.perf_counter()
        init_seed = derive_seed(self.config.seed, "init", server_round)
        self._tasks = {}
        for cid in self.schedule.sample(server_round):
            plan = self.method.plan(cid, server_round)
            self._tasks[cid] = ClientTask(
                client_id=cid, server_round=server_round, plan=plan, alpha=self.config.alpha_for(plan.rank),
                init_seed=init_seed, data_seed=derive_seed(self.config.seed, "data", server_round, cid),
                local_steps=self.schedule.local_steps(cid),
                **(self.privacy.task_options(cid, server_round) if self.privacy else {}))
        if self.privacy is not None:
            self.privacy.account(self._tasks.values())
        return list(self._tasks.values())

    def aggregate_train(self, server_round: int, results: Iterable[ClientResult],
                        failures: Sequence[ClientFailure] = (), refused: Sequence[AggregationError] = ()) -> RoundRow:
        """``results`` may be a generator (in-process, each client trains when drawn): each is let
        go of once in the aggregate, aggregated in task order whatever order it comes in.
        ``refused``: replies the runtime rejected before they became results (Flower's)."""
        tasks, self._tasks = self._tasks, {}
        accumulator = self.method.accumulator(
            [(cid, dict.fromkeys(self.shapes, task.plan.rank)) for cid, task in tasks.items()])
        row = RoundRow(server_round, self.config.method, failures=[asdict(failure) for failure in failures])
        accepted: list[Contribution] = []

        def reject(error: AggregationError) -> None:
            row.rejected.append({"client_id": error.client_id, "module": error.module, "rule": error.rule,
                                 "reason": str(error)})
            self.log(f"round {server_round}: rejected update: {error}")

        for error in refused:
            reject(error)
        for failure in failures:
            self.log(f"round {server_round}: client {failure.client_id} failed: {failure.reason}")
        for result in results:
            started = time.perf_counter()
            task = tasks.pop(result.update.client_id, None)  # None: not asked, or answered already
            try:
                if task is not None:
                    self.ledger.charge(task, result.update)
                accumulator.add(admit(result.update, task, self.shapes, self.config))
                accepted.append(Contribution(task.client_id, result.update.num_examples, result.train_loss,
                                             result.seconds, task.plan.start))
            except AggregationError as error:
                reject(error)
            del result  # the accumulator holds what it needs of the upload
            row.server_seconds += time.perf_counter() - started
        started = time.perf_counter()
        self._aggregate(row, accumulator, accepted, reject)
        row.server_seconds += time.perf_counter() - started
        reported = [c for c in accepted if c.train_loss is not None]  # DP-SGD clients withhold theirs
        examples = sum(c.num_examples for c in reported)
        row.train_loss = sum(c.train_loss * c.num_examples for c in reported) / examples if reported else None
        row.clients, row.client_seconds = [c.client_id for c in accepted], sum(c.seconds for c in accepted)
        row.measured(self.ledger.round_totals(server_round))
        return self._finish_round(row)

    def _aggregate(self, row: RoundRow, accumulator: Accumulator, accepted: list[Contribution],
                   reject: Callable[[AggregationError], None]) -> None:
        """Aggregate and apply; a client the method refuses (a frozen factor unlike the others')
        is rejected and the rest aggregated; with fewer than ``min_clients`` the round is skipped."""
        before = self.method.evaluation_adapters()
        while len(accepted) >= self.config.min_clients:
            try:
                weights = client_weights(accumulator.updates(), self.config.weighting)
                update = accumulator.result(weights, server_round=row.round)
            except AggregationError as error:
                culprit = [c for c in accepted if c.client_id == error.client_id]
                if not culprit:
                    raise
                reject(error)
                accepted.remove(culprit[0])
                accumulator.drop(error.client_id)
                continue
            self._apply(row.round, update)
            if not self.method.personalised:  # one global model, to compare with the exact average
                updates = accumulator.updates()
                shares = dict(zip((u.client_id for u in updates), example_weights(updates, weights)))
                row.measured(round_errors(self.method, before, update, accumulator.exact_sum(),
                                          [(c.start, shares[c.client_id]) for c in accepted],
                                          self.schedule.client_shares(), row.round + 1))
            row.measured(update.info)
            return
        row.skipped = True
        self.log(f"round {row.round}: only {len(accepted)} usable updates (< min_clients "
                 f"{self.config.min_clients}); round skipped, global model kept")

    def _apply(self, server_round: int, update: GlobalUpdate) -> None:
        self.global_model.apply(update)
        merged = GlobalUpdate(factors=update.factors if update.merge else {}, merge=update.merge,
                              residual=update.residual)
        params = factor_params(merged.factors) + factor_params(merged.residual)
        if params:
            self.ledger.merged(server_round, params)
            if self.on_merge is not None:
                self.on_merge(server_round, merged)
        self.method.commit(server_round, update)

    def evaluate(self, server_round: int) -> dict:
        """The global model, or each client's own and their mean (a personalised method's)."""
        adapters = self.method.evaluation_adapters()
        if not self.method.personalised:
            return self.evaluate_adapter(adapters[None], server_round)
        own = self.client_models.evaluate(server_round, adapters, self.method.kept_on_client,
                                          lambda adapter: self.evaluate_adapter(adapter, server_round))
        return mean_over_clients(own)

    def evaluate_adapter(self, adapter: dict[str, LoraFactors] | None, server_round: int) -> dict:
        """The global model with ``adapter`` merged in (None: as it is), evaluated."""
        with self.global_model.with_adapter(adapter) as model:
            return self.evaluate_model(model, server_round)

    def _finish_round(self, row: RoundRow) -> RoundRow:
        evaluated = time.perf_counter()
        row.measured(self.evaluate(row.round))
        if self.privacy is not None:
            row.measured(self.privacy.row())
        row.eval_seconds = time.perf_counter() - evaluated
        row.seconds = time.perf_counter() - (self._round_started if row.round else evaluated)
        self.rows.append(row)
        self.completed_round = row.round
        self.checkpoints.save(row.round)
        append_metrics(self.run_dir, row.to_json())  # after the checkpoint that holds it
        return row

    def summary(self) -> dict:
        return {"method": self.config.method, "rounds": self.completed_round,
                "final": self.rows[-1].to_json() if self.rows else None,
                "communication": self.ledger.summary(),
                "best_eval_loss": min((r.eval_loss for r in self.rows if r.eval_loss is not None), default=None),
                **(self.privacy.summary() if self.privacy is not None else {})}
