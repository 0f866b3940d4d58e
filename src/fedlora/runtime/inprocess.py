"""The default runtime: every client trains in this process, one after another, on one model."""

from __future__ import annotations

from collections.abc import Iterator

from fedlora.engine.personalisation import train_from_store
from fedlora.engine.setup import RunSetup
from fedlora.engine.task import ClientResult, ClientTask
from fedlora.runtime.observer import RunObserver


def run_inprocess(setup: RunSetup, observer: RunObserver | None = None) -> dict:
    """Run (or continue) the federation to its configured number of rounds; returns the summary.

    The clients' own stores (factors a method keeps on them) are the run folder's
    ``client-state/``, which the federation's evaluation of the clients' models reads too.
    """
    observer = observer or RunObserver()
    federation = setup.federation
    if federation.start() == 0:
        observer.round_finished(federation.rows[-1])
    setup.client_store.discard_after(federation.completed_round)  # the rounds after the checkpoint are redone
    for server_round in range(federation.completed_round + 1, setup.config.rounds + 1):
        tasks = federation.configure_train(server_round)
        observer.round_started(server_round, tasks)
        observer.round_finished(federation.aggregate_train(server_round, _train_each(setup, tasks, observer)))
    truncated = sum(examples.truncated for examples in setup.client_examples.values())
    if truncated:
        observer.log(f"{truncated} training examples were truncated to max_length {setup.config.max_length}")
    return {**federation.summary(), "training_examples_truncated": truncated}


def _train_each(setup: RunSetup, tasks: list[ClientTask], observer: RunObserver) -> Iterator[ClientResult]:
    """The clients' results, each trained when the federation asks for it: the federation adds
    an upload to the aggregate and drops it before the next client trains."""
    for task in tasks:
        observer.client_started(task)
        result = train_from_store(lambda kept: setup.trainer.train(kept, setup.client_examples[task.client_id],
                                                                   on_step=observer.step_callback(task)),
                                  setup.client_store, task)
        observer.client_finished(result)
        yield result
        del result  # not held while the next client trains
