"""The server's gate: what a client's reply must be before its update joins the aggregate.

Updates are validated once, here, after the factors a client does not upload were taken from
the start it was sent (a frozen factor is the server's own, whatever the client did to it);
accumulators and methods trust what passes.
"""

from __future__ import annotations

import math
from dataclasses import replace

from fedlora.aggregation import AggregationError, ClientUpdate
from fedlora.aggregation.factors import CORE, FACTOR_NAMES, factor_names
from fedlora.aggregation.validation import validate_update
from fedlora.engine.config import RunConfig
from fedlora.engine.task import ClientTask


def received(update: ClientUpdate, task: ClientTask) -> ClientUpdate:
    """The update as the server has it: the factors the client uploads, the others those of the
    start it was sent (a frozen factor, or the stand-in for one the client keeps), whatever the
    reply held in their place (the Flower codec sends only the uploads)."""
    withheld = frozenset(FACTOR_NAMES) - task.plan.uploads
    start = task.plan.start
    if not withheld:
        return update
    factors = {module: replace(f, **{name: getattr(start[module], name).to(getattr(f, name).device)
                                     for name in withheld})
               if module in start else f  # a module not asked for: validation names it
               for module, f in update.factors.items()}
    return replace(update, factors=factors)


def most_processed(task: ClientTask, update: ClientUpdate, config: RunConfig) -> int:
    """The most examples a client's steps can process: full batches every step, or, for DP-SGD's
    Poisson batches, every example every step."""
    per_step = update.num_examples if task.dp_noise_multiplier is not None else config.batch_size * config.grad_accum
    return task.local_steps * per_step


def admit(update: ClientUpdate, task: ClientTask | None, shapes: dict[str, tuple[int, int]],
          config: RunConfig) -> ClientUpdate:
    """The update as received, once it passed every rule; AggregationError (client, module, rule)
    for one that did not: not asked for, structure, finiteness, norm and example bounds, the
    assigned rank (at most it, for AdaLoRA) and scale."""
    if task is None:
        raise AggregationError("sent an update it was not asked for", client_id=update.client_id,
                               rule="unexpected")
    update = received(update, task)
    validate_update(update, shapes, max_norm=config.max_update_norm, max_examples=config.max_examples)
    most = most_processed(task, update, config)
    if update.num_processed is not None and update.num_processed > most:
        raise AggregationError(f"num_processed {update.num_processed} exceeds the {most} examples its "
                               f"{task.local_steps} steps can process", client_id=update.client_id,
                               rule="num_processed")
    expected_scale = config.scale_for(task.plan.rank)
    core = CORE in factor_names(task.plan.start)
    for module, factors in update.factors.items():
        if (factors.H is not None) != core:
            raise AggregationError("sent a core H it was not asked for" if factors.H is not None else
                                   "sent no core H, which its plan trains", client_id=update.client_id,
                                   module=module, rule="shape")
        if not math.isclose(factors.scale, expected_scale, rel_tol=1e-6):
            raise AggregationError(f"scale {factors.scale:g} differs from the assigned α/r = {expected_scale:g}",
                                   client_id=update.client_id, module=module, rule="scale")
        if task.plan.adalora is not None:  # AdaLoRA sends the triplets its budget kept
            if factors.rank > task.plan.rank:
                raise AggregationError(f"rank {factors.rank} exceeds the assigned {task.plan.rank}",
                                       client_id=update.client_id, module=module, rule="shape")
        elif factors.rank != task.plan.rank:
            raise AggregationError(f"rank {factors.rank} differs from the assigned {task.plan.rank}",
                                   client_id=update.client_id, module=module, rule="shape")
    return update
