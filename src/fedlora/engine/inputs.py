"""From a RunConfig to the data and the model: what the server and every client load alike."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedlora.data import AnyRecord, load_clients, resolve_prompt_format
from fedlora.engine.config import DEFAULT_DATA, HUB_FALLBACK_DATA, RunConfig, check_ranks_fit
from fedlora.models import USER_CACHE, load_model, model_shapes
from fedlora.quantization import Quantization

Log = Callable[[str], None]


def resolve_data_paths(config: RunConfig, log: Log) -> RunConfig:
    """Fill in data defaults: the shared Dolly clients when present, else the Hub dataset; the
    test records beside the clients' files."""
    if config.data_on_nodes:
        return config  # the server reads no client data, so there is nothing to default from it
    data = config.data
    if data == DEFAULT_DATA and not Path(data).exists():
        log(f"{DEFAULT_DATA} not found: using {HUB_FALLBACK_DATA} split by {config.partition} over "
            f"{config.partition_by} into {config.clients or 10} clients")
        data = HUB_FALLBACK_DATA
    # MMLU is not looked for: at chance on small models and costly, it is scored only when asked
    test_data = config.test_data
    if test_data is None and Path(data, "global_test.json").is_file():
        test_data = str(Path(data, "global_test.json"))
    return config.replace(data=data, test_data=test_data)


def load_client_records(config: RunConfig) -> dict[str, list[AnyRecord]]:
    clients = load_clients(config.data, num_clients=config.clients or 10, partition=config.partition,
                           alpha=config.dirichlet_alpha, min_size=config.min_partition_size,
                           seed=config.seed, by=config.partition_by)
    if config.clients is not None and Path(config.data).is_dir():
        clients = dict(list(clients.items())[:config.clients])  # the first N given clients
    return clients


def run_prompt_format(config: RunConfig, tokenizer, log: Log = lambda message: None) -> str:
    """The prompt format training and held-out loss use alike, said in ``log``."""
    prompt_format = resolve_prompt_format(config.prompt_format, tokenizer)
    if config.prompt_format is not None:
        reason = "as configured"
    else:
        reason = f"auto: the tokenizer has {'a' if prompt_format == 'chat' else 'no'} chat template"
    log(f"prompt format: {prompt_format} ({reason})")
    return prompt_format


def check_model_fits(config: RunConfig) -> list[str]:
    """The adapted module names, after checking the ranks fit them (reads no weights)."""
    shapes = model_shapes(config.model, config.target_modules, gguf_file=config.gguf_file,
                          trust_remote_code=config.trust_remote_code)
    check_ranks_fit(config, shapes)
    return list(shapes)


def load_run_model(config: RunConfig, *, gguf_cache: Path | str | None = USER_CACHE):
    return load_model(config.model, gguf_file=config.gguf_file, device=config.device, dtype=config.dtype,
                      seed=config.seed, trust_remote_code=config.trust_remote_code, gguf_cache=gguf_cache,
                      quantization=Quantization.from_config(config))
