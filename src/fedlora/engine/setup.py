"""From a RunConfig to everything a run needs: data, model, trainer, evaluator, federation.

Both runtimes call this, so an in-process run and a Flower run are built the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fedlora.data import LazyTokenizedRecords, Record, centralize, load_clients, load_mmlu, load_records, \
    split_clients, tokenize_records
from fedlora.engine.config import DEFAULT_DATA, HUB_FALLBACK_DATA, RunConfig, check_client_count, \
    check_ranks_fit
from fedlora.engine.client import LocalTrainer
from fedlora.engine.evaluator import Evaluator
from fedlora.engine.federation import Federation
from fedlora.engine.global_model import GlobalModel
from fedlora.eval.loss import pad_token_id
from fedlora.models import load_model, model_shapes

Log = Callable[[str], None]


def resolve_data_paths(config: RunConfig, log: Log) -> RunConfig:
    """Fill in data defaults: the shared Dolly clients when present, else the Hub dataset."""
    if config.data_on_nodes:
        return config  # the server reads no client data, so there is nothing to default from it
    data = config.data
    if data == DEFAULT_DATA and not Path(data).exists():
        log(f"{DEFAULT_DATA} not found: using {HUB_FALLBACK_DATA} split by {config.partition} over "
            f"{config.partition_by} into {config.clients or 10} clients")
        data = HUB_FALLBACK_DATA
    test_data, mmlu = config.test_data, config.mmlu
    if test_data is None and Path(data, "global_test.json").is_file():
        test_data = str(Path(data, "global_test.json"))
    shared_mmlu = Path(data).parent / "mmlu" / "mmlu_test_1444.json"
    if mmlu is None and Path(data).is_dir() and shared_mmlu.is_file():
        mmlu = str(shared_mmlu)
    return config.replace(data=data, test_data=test_data, mmlu=mmlu)


def load_client_records(config: RunConfig) -> dict[str, list[Record]]:
    clients = load_clients(config.data, num_clients=config.clients or 10, partition=config.partition,
                           alpha=config.dirichlet_alpha, min_size=config.min_partition_size,
                           seed=config.seed, by=config.partition_by)
    if config.clients is not None and Path(config.data).is_dir():
        clients = dict(list(clients.items())[:config.clients])  # the first N given clients
    return clients


def centralized_config(config: RunConfig, num_clients: int) -> RunConfig:
    """One client holding all data, trained for the steps all sampled clients train per round."""
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


def check_model_fits(config: RunConfig) -> list[str]:
    """The adapted module names, after checking the ranks fit them (reads no weights)."""
    shapes = model_shapes(config.model, config.target_modules, gguf_file=config.gguf_file,
                          trust_remote_code=config.trust_remote_code)
    check_ranks_fit(config, shapes)
    return list(shapes)


def load_run_model(config: RunConfig, *, gguf_cache: Path | str | None = None):
    return load_model(config.model, gguf_file=config.gguf_file, device=config.device, dtype=config.dtype,
                      seed=config.seed, trust_remote_code=config.trust_remote_code, gguf_cache=gguf_cache)


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
    if config.method == "centralized":
        config = centralized_config(config, len(clients))
        clients = {"centralized": centralize(clients)}
    test_records = load_records(config.test_data)[:config.test_limit] if config.test_data else []
    questions = load_mmlu(config.mmlu, limit=config.mmlu_limit) if config.mmlu else []
    modules = check_model_fits(config)
    model, tokenizer = loaded or load_run_model(config)
    pad_id = pad_token_id(tokenizer)
    client_examples = {cid: LazyTokenizedRecords(tokenizer, records, config.max_length)
                       for cid, records in clients.items()}
    test_examples, stats = tokenize_records(tokenizer, test_records, config.max_length)
    if stats.truncated:
        log(f"{stats.truncated} of {stats.examples} test records truncated to max_length {config.max_length}")
    validation_examples, _ = tokenize_records(tokenizer, validation_records, config.max_length)
    evaluator = Evaluator(tokenizer, pad_id, test_examples, questions, final_round=config.rounds,
                          mmlu_every=config.mmlu_every, batch_size=config.eval_batch_size,
                          mmlu_progress=mmlu_progress, validation_examples=validation_examples)
    # with the data on the nodes the server knows the clients by partition id, their sizes not at all
    client_sizes = ({str(i): None for i in range(num_clients)} if config.data_on_nodes
                    else {cid: len(examples) for cid, examples in client_examples.items()})
    federation = Federation(config, client_sizes, GlobalModel(model, modules), evaluator, run_dir,
                            keep_base_log=keep_base_log, log=log)
    trainer = LocalTrainer.from_config(model, pad_id, config)
    return RunSetup(config, model, tokenizer, client_examples, trainer, federation)
