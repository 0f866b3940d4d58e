"""From a RunConfig to everything a run needs: data, model, trainer, evaluator, federation.

Both runtimes call this, so an in-process run and a Flower run are built the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fedlora.aggregation import aggregator_class
from fedlora.data import LazyTokenizedRecords, centralize, split_clients
from fedlora.engine.config import RunConfig, check_client_count
from fedlora.engine.client import LocalTrainer
from fedlora.engine.evaluator import evaluation_inputs, run_evaluator
from fedlora.engine.federation import Federation
from fedlora.engine.global_model import GlobalModel
from fedlora.engine.inputs import Log, check_model_fits, load_client_records, load_run_model, resolve_data_paths
from fedlora.models import pad_token_id


def pooled_config(config: RunConfig, num_clients: int) -> RunConfig:
    """One client holding all data (a method that ``pools_data``), sampled every round and
    trained for the steps all sampled clients train per round, at the largest rank."""
    per_round = config.sampled_per_round(num_clients)
    steps = config.local_steps * per_round if config.local_steps is not None else None
    return config.replace(ranks=[max(config.ranks)], fraction=1.0, clients_per_round=None,
                          min_clients=1, local_steps=steps)


@dataclass
class RunSetup:
    config: RunConfig
    model: nn.Module
    tokenizer: object
    client_examples: dict[str, LazyTokenizedRecords]
    trainer: LocalTrainer
    federation: Federation


def prepare_run(config: RunConfig, run_dir: Path, *, log: Log = print, keep_base_log: bool = False,
                mmlu_progress: Callable[[int, int], None] | None = None,
                loaded: tuple[nn.Module, object] | None = None) -> RunSetup:
    """Load data first (cheap, most likely to be wrong), then the model; build the federation.

    ``loaded`` is an already loaded (model, tokenizer) of ``config.model`` in its pristine
    state, for callers running many federations on one model (a sweep).
    """
    config = resolve_data_paths(config, log)
    clients = {} if config.data_on_nodes else load_client_records(config)
    num_clients = config.clients if config.data_on_nodes else len(clients)
    check_client_count(config, num_clients)
    clients, validation_records = split_clients(clients, config.validation_fraction, config.seed)
    if aggregator_class(config.method).pools_data:
        config = pooled_config(config, len(clients))
        clients = {config.method: centralize(clients)}
    test_records, questions = evaluation_inputs(config)
    modules = check_model_fits(config)
    model, tokenizer = loaded or load_run_model(config)
    pad_id = pad_token_id(tokenizer)
    client_examples = {cid: LazyTokenizedRecords(tokenizer, records, config.max_length)
                       for cid, records in clients.items()}
    trainer = LocalTrainer.from_config(model, pad_id, config, log=log)
    evaluator = run_evaluator(config, tokenizer, pad_id, test_records, questions, log=log,
                              mmlu_progress=mmlu_progress, validation_records=validation_records,
                              packed=trainer.packing)
    # with the data on the nodes the server knows the clients by partition id, their sizes not at all
    client_sizes = ({str(i): None for i in range(num_clients)} if config.data_on_nodes
                    else {cid: len(examples) for cid, examples in client_examples.items()})
    federation = Federation(config, client_sizes, GlobalModel(model, modules), evaluator, run_dir,
                            keep_base_log=keep_base_log, log=log)
    return RunSetup(config, model, tokenizer, client_examples, trainer, federation)
