"""The default runtime: every client trains in this process, one after another, on one model."""

from __future__ import annotations

from fedlora.engine.setup import RunSetup
from fedlora.runtime.observer import RunObserver


def run_inprocess(setup: RunSetup, observer: RunObserver | None = None) -> dict:
    """Run (or continue) the federation to its configured number of rounds; returns the summary."""
    observer = observer or RunObserver()
    federation = setup.federation
    if federation.start() == 0:
        observer.round_finished(federation.rows[-1])
    for server_round in range(federation.completed_round + 1, federation.num_rounds + 1):
        tasks = federation.configure_train(server_round)
        observer.round_started(server_round, tasks)
        results = []
        for task in tasks:
            observer.client_started(task)
            on_step = observer.step_callback(task)
            results.append(setup.trainer.train(task, setup.client_examples[task.client_id], on_step=on_step))
            observer.client_finished(results[-1])
        observer.round_finished(federation.aggregate_train(server_round, results))
    truncated = sum(examples.truncated for examples in setup.client_examples.values())
    if truncated:
        observer.log(f"{truncated} training examples were truncated to max_length {setup.config.max_length}")
    return {**federation.summary(), "training_examples_truncated": truncated}
