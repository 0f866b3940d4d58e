"""The default runtime: every client trains in this process, one after another, on one model."""

from __future__ import annotations

from collections.abc import Iterator

from fedlora.engine.client_state import CLIENT_STATE_DIR, ClientStore, train_from_store
from fedlora.engine.federation import Federation
from fedlora.engine.setup import RunSetup
from fedlora.engine.task import ClientResult, ClientTask
from fedlora.runtime.observer import RunObserver


def run_inprocess(setup: RunSetup, observer: RunObserver | None = None) -> dict:
    """Run (or continue) the federation to its configured number of rounds; returns the summary.

    The clients' own stores (factors a method keeps on them) are in the run folder's
    ``client-state/``; the server-side evaluation reads them to evaluate the clients' models,
    which only this runtime can (they never reach the server).
    """
    observer = observer or RunObserver()
    federation = setup.federation
    store = evaluate_clients_in_process(federation)
    if federation.start() == 0:
        observer.round_finished(federation.rows[-1])
    store.discard_after(federation.completed_round)  # the rounds after the checkpoint are redone
    for server_round in range(federation.completed_round + 1, federation.num_rounds + 1):
        tasks = federation.configure_train(server_round)
        observer.round_started(server_round, tasks)
        observer.round_finished(federation.aggregate_train(server_round, _train_each(setup, store, tasks, observer)))
    truncated = sum(examples.truncated for examples in setup.client_examples.values())
    if truncated:
        observer.log(f"{truncated} training examples were truncated to max_length {setup.config.max_length}")
    return {**federation.summary(), "training_examples_truncated": truncated}


def evaluate_clients_in_process(federation: Federation) -> ClientStore:
    """Let ``federation`` evaluate the clients' own models from their stores in the run folder;
    returns the store."""
    store = ClientStore(federation.run_dir / CLIENT_STATE_DIR)
    federation.evaluate_clients = lambda server_round, adapters: {
        cid: federation.evaluate_adapter(store.personalised(cid, server_round, adapter), server_round)
        for cid, adapter in adapters.items()}
    return store


def _train_each(setup: RunSetup, store: ClientStore, tasks: list[ClientTask],
                observer: RunObserver) -> Iterator[ClientResult]:
    """The clients' results, each trained when the federation asks for it: the federation adds
    an upload to the aggregate and drops it before the next client trains."""
    for task in tasks:
        observer.client_started(task)
        result = train_from_store(lambda kept: setup.trainer.train(kept, setup.client_examples[task.client_id],
                                                                   on_step=observer.step_callback(task)),
                                  store, task)
        observer.client_finished(result)
        yield result
        del result  # not held while the next client trains
