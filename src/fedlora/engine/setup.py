"""From a RunConfig to everything a run needs: data, model, trainer, evaluator, federation.

Every runtime calls this, so an in-process run and a Flower run are built the same way; what a
runtime adds (where its clients' own models are evaluated, what it keeps across a resume, what
it does with each base merge) it passes in here, and the Federation receives it at construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fedlora.aggregation import GlobalUpdate, RunContext, RunShape, aggregator_class, get_aggregator
from fedlora.data import LazyTokenizedRecords, split_clients
from fedlora.engine.config import RunConfig, check_client_count
from fedlora.engine.client import LocalTrainer
from fedlora.engine.evaluator import Evaluator, Progress, evaluation_inputs, run_evaluator
from fedlora.engine.federation import Evaluate, Federation
from fedlora.engine.global_model import GlobalModel
from fedlora.engine.inputs import (Log, check_model_fits, load_client_records, load_run_model, resolve_data_paths,
                                   run_prompt_format)
from fedlora.engine.personalisation import CLIENT_STATE_DIR, ClientModels, ClientStore, StoredClientModels
from fedlora.engine.privacy import run_privacy
from fedlora.engine.run_state import Stateful
from fedlora.engine.schedule import Schedule
from fedlora.lora import module_shape
from fedlora.models import pad_token_id


@dataclass
class RunSetup:
    config: RunConfig
    model: nn.Module
    tokenizer: object
    client_examples: dict[str, LazyTokenizedRecords]
    trainer: LocalTrainer
    #: the run folder's client stores: where an in-process run's clients keep their own factors
    client_store: ClientStore
    federation: Federation


def arranged(config: RunConfig, clients: dict[str, list]) -> tuple[RunConfig, dict[str, list]]:
    """The clients and configuration as the method arranges them (a baseline may pool them into one)."""
    shape = RunShape(list(config.ranks), config.sampled_per_round(len(clients)), config.local_steps, config.min_clients)
    clients, new = aggregator_class(config.method).arrange(clients, shape)
    if new != shape:
        config = config.replace(ranks=new.ranks, clients_per_round=new.clients_per_round,
                                local_steps=new.local_steps, min_clients=new.min_clients)
    return config, clients


def prepare_run(config: RunConfig, run_dir: Path, *, log: Log = print,
                loaded: tuple[nn.Module, object] | None = None,
                evaluation: Callable[[Evaluator, GlobalModel], Evaluate] = lambda evaluator, model: evaluator,
                progress: Progress | None = None,
                client_models: ClientModels | None = None, runtime_state: Mapping[str, Stateful] = {},
                on_merge: Callable[[int, GlobalUpdate], None] | None = None) -> RunSetup:
    """Load data first (cheap, most likely to be wrong), then the model; build the federation.

    ``loaded`` is an already loaded (model, tokenizer) of ``config.model`` in its pristine
    state, for callers running many federations on one model (a sweep); ``evaluation`` turns
    the run's evaluator into what the federation calls on the global model (a sweep's:
    remembered results); ``progress``: how far a long measurement (MMLU, generation) has got.
    ``client_models``: where the clients' own models are evaluated; by default from the run
    folder's client stores, here. ``runtime_state`` and ``on_merge``: see :class:`Federation`.
    """
    config = resolve_data_paths(config, log)
    clients = {} if config.data_on_nodes else load_client_records(config)
    num_clients = config.clients if config.data_on_nodes else len(clients)
    check_client_count(config, num_clients)
    clients, validation_records = split_clients(clients, config.validation_fraction, config.seed)
    config, clients = arranged(config, clients)
    test_records, questions = evaluation_inputs(config)
    modules = check_model_fits(config)
    model, tokenizer = loaded or load_run_model(config)
    pad_id = pad_token_id(tokenizer)
    prompt_format = run_prompt_format(config, tokenizer, log)
    client_examples = {cid: LazyTokenizedRecords(tokenizer, records, config.max_length, prompt_format=prompt_format)
                       for cid, records in clients.items()}
    trainer = LocalTrainer.from_config(model, pad_id, config, log=log)
    evaluator = run_evaluator(config, tokenizer, pad_id, test_records, questions, prompt_format=prompt_format,
                              log=log, progress=progress, validation_records=validation_records,
                              packed=trainer.packing)
    # with the data on the nodes the server knows the clients by partition id, their sizes not at all
    client_sizes = ({str(i): None for i in range(num_clients)} if config.data_on_nodes
                    else {cid: len(examples) for cid, examples in client_examples.items()})
    schedule = Schedule(config, client_sizes)
    privacy = run_privacy(config, client_sizes, schedule.sample, schedule.local_steps)
    method = get_aggregator(config.method, **config.method_options)
    if privacy is not None:
        method = privacy.protect(method, config.sampled_per_round(len(client_sizes)))
    ranks = {cid: config.rank_of(i) for i, cid in enumerate(client_sizes)}
    method.setup(RunContext(ranks=ranks, scales={cid: config.scale_for(rank) for cid, rank in ranks.items()},
                            shapes={m: module_shape(model, m) for m in modules}, seed=config.seed))
    store, global_model = ClientStore(Path(run_dir) / CLIENT_STATE_DIR), GlobalModel(model, modules)
    federation = Federation(config, schedule, global_model, method, evaluation(evaluator, global_model), run_dir,
                            privacy=privacy, client_models=client_models or StoredClientModels(store),
                            runtime_state=runtime_state, on_merge=on_merge, log=log)
    return RunSetup(config, model, tokenizer, client_examples, trainer, store, federation)
