"""The run configuration: one dataclass, loaded from TOML, overridden by CLI flags, validated
before any model or data is loaded."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.aggregation import aggregator_class, available_aggregators

#: Methods the engine runs that are not aggregation rules of their own.
BASELINES = ("centralized", "local")

DEFAULT_DATA = "../shared/data/dolly-10clients"
#: Used when the shared data folder is absent (a user's own machine): split by Dirichlet.
HUB_FALLBACK_DATA = "databricks/databricks-dolly-15k"


class ConfigError(ValueError):
    """A configuration value that cannot be run; names the source and the key."""


@dataclass
class RunConfig:
    """Everything a run needs. Keys of the TOML file are these field names."""

    # model
    model: str = "smollm2-135m"
    gguf_file: str | None = None
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    # data
    data: str = DEFAULT_DATA
    test_data: str | None = None
    mmlu: str | None = None
    clients: int | None = None
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    partition_by: str = "category"
    min_partition_size: int = 10
    max_length: int = 256
    #: share of each client's records held out of its training for val_loss (seeded; ≥ 1 record when > 0)
    validation_fraction: float = 0.02
    # federation
    method: str = "flora"
    method_options: dict[str, Any] = field(default_factory=dict)
    rounds: int = 3
    fraction: float = 1.0
    clients_per_round: int | None = None
    min_clients: int = 1
    # LoRA
    ranks: list[int] = field(default_factory=lambda: [16])
    alpha: float | None = None
    alpha_ratio: float = 2.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # client training
    local_steps: int | None = 10
    local_epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    seed: int = 0
    # update validation
    max_update_norm: float | None = None
    max_examples: int | None = None
    # evaluation
    eval_batch_size: int = 8
    test_limit: int | None = None
    mmlu_limit: int | None = None
    mmlu_every: int = 0
    # runtime and outputs
    runtime: str = "inprocess"
    superlink: str | None = None
    root_certificates: str | None = None
    #: the clients' records stay on the SuperNodes (each started with its own ``data=``): the
    #: server reads none, knows the clients by partition id ("0" … "clients-1") and their sizes
    #: only from their updates
    data_on_nodes: bool = False
    client_timeout: float = 600.0
    out: str = "runs/latest"

    def rank_of(self, index: int) -> int:
        """Rank of the client at ``index`` in client order: one rank for all, or one each."""
        return self.ranks[0] if len(self.ranks) == 1 else self.ranks[index]

    def sampled_per_round(self, num_clients: int) -> int:
        return self.clients_per_round or max(1, round(self.fraction * num_clients))

    def alpha_for(self, rank: int) -> float:
        return self.alpha if self.alpha is not None else self.alpha_ratio * rank

    def scale_for(self, rank: int) -> float:
        """The LoRA scale s = α/r (α/√r with rsLoRA) of a client of ``rank``."""
        return self.alpha_for(rank) / (math.sqrt(rank) if self.use_rslora else rank)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(RunConfig)


def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    """Check ``value`` against the field's annotation, accepting ints for floats."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option, source)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    expected = origin or annotation
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list and key == "ranks" and isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if expected is list and key in ("ranks", "target_modules") and isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
        if key == "ranks":
            try:
                value = [int(part) for part in value]
            except ValueError:
                raise ConfigError(f"{source}: 'ranks' must be integers like 64,32,16, got {value}") from None
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key!r} must be {getattr(expected, '__name__', expected)}, "
                          f"got {type(value).__name__} {value!r}")
    if expected is list:
        (item_type,) = typing.get_args(annotation)
        for item in value:
            if not isinstance(item, item_type) or isinstance(item, bool):
                raise ConfigError(f"{source}: every item of {key!r} must be {item_type.__name__}, got {item!r}")
    return value


def build_config(values: dict[str, Any], source: str = "config", base: RunConfig | None = None) -> RunConfig:
    """A RunConfig from ``values`` layered over ``base``; unknown keys and wrong types are errors."""
    hints = _field_types()
    checked = {}
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        checked[key] = _coerce(key, value, hints[key], source)
    if checked.get("local_epochs") is not None and "local_steps" not in checked:
        checked["local_steps"] = None  # epochs replace the default step count
    config = dataclasses.replace(base or RunConfig(), **checked)
    validate(config, source)
    return config


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML file (optional), then apply ``overrides`` (CLI flags that were given)."""
    config = RunConfig()
    if path is not None:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
        config = build_config(values, source=str(path))
    return build_config(overrides or {}, source="command line", base=config)


def validate(config: RunConfig, source: str = "config") -> None:
    """Reject impossible values before any model or data is loaded."""
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key!r} {message}")

    known = available_aggregators() + list(BASELINES)
    if config.method not in known:
        fail("method", f"is {config.method!r}; choose one of {', '.join(known)}")
    if config.method not in BASELINES:
        try:
            aggregator_class(config.method)(**config.method_options)
        except (TypeError, ValueError) as error:
            fail("method_options", f"do not fit method {config.method!r}: {error}")
    if not config.ranks or any(rank < 1 for rank in config.ranks):
        fail("ranks", f"must be integers ≥ 1, got {config.ranks}")
    if not (0 < config.fraction <= 1) or math.isnan(config.fraction):
        fail("fraction", f"must be in (0, 1], got {config.fraction}")
    if config.method not in BASELINES and len(set(config.ranks)) > 1 \
            and not aggregator_class(config.method).heterogeneous_ranks:
        fail("ranks", f"are mixed ({config.ranks}) but {config.method!r} needs one rank for all "
                      "clients; use method 'flora' or 'zeropad' for heterogeneous ranks")
    positive = {"rounds": config.rounds, "batch_size": config.batch_size, "grad_accum": config.grad_accum,
                "max_length": config.max_length, "eval_batch_size": config.eval_batch_size,
                "min_clients": config.min_clients, "min_partition_size": config.min_partition_size}
    optional_positive = {"clients": config.clients, "clients_per_round": config.clients_per_round,
                         "local_steps": config.local_steps, "local_epochs": config.local_epochs,
                         "test_limit": config.test_limit,
                         "max_update_norm": config.max_update_norm, "max_examples": config.max_examples,
                         "alpha": config.alpha}
    for key, value in positive.items():
        if value < 1:
            fail(key, f"must be ≥ 1, got {value}")
    for key, value in optional_positive.items():
        if value is not None and not value > 0:
            fail(key, f"must be > 0, got {value}")
    for key in ("lr", "alpha_ratio", "dirichlet_alpha", "client_timeout"):
        value = getattr(config, key)
        if not value > 0 or not math.isfinite(value):
            fail(key, f"must be a positive number, got {value}")
    if config.weight_decay < 0:
        fail("weight_decay", f"must be ≥ 0, got {config.weight_decay}")
    if config.mmlu_every < 0:
        fail("mmlu_every", f"must be ≥ 0, got {config.mmlu_every}")
    if config.mmlu_limit is not None and config.mmlu_limit < 0:
        fail("mmlu_limit", f"must be ≥ 0 (0: no MMLU), got {config.mmlu_limit}")
    if not 0 <= config.validation_fraction < 1:
        fail("validation_fraction", f"must be in [0, 1), got {config.validation_fraction}")
    if (config.local_steps is None) == (config.local_epochs is None):
        fail("local_steps", "and 'local_epochs': set exactly one")
    if config.partition not in ("iid", "dirichlet"):
        fail("partition", f"must be 'iid' or 'dirichlet', got {config.partition!r}")
    if config.runtime not in ("inprocess", "flower"):
        fail("runtime", f"must be 'inprocess' or 'flower', got {config.runtime!r}")
    if config.runtime == "flower" and config.method == "centralized":
        fail("method", "'centralized' is one client holding all data: run it with runtime 'inprocess'")
    if config.data_on_nodes:
        if config.runtime != "flower" or config.superlink is None:
            fail("data_on_nodes", "needs runtime 'flower' and a 'superlink' whose SuperNodes hold the data")
        if config.clients is None:
            fail("clients", "must say how many SuperNodes hold data when 'data_on_nodes' is set")
        if config.local_epochs is not None:
            fail("local_epochs", "need each client's size, which the server does not read with "
                                 "'data_on_nodes': set 'local_steps' instead")
    if config.dtype not in (None, "float32", "bfloat16", "float16"):
        fail("dtype", f"must be float32, bfloat16 or float16, got {config.dtype!r}")
    if not config.target_modules:
        fail("target_modules", "must name at least one module")


def check_client_count(config: RunConfig, num_clients: int) -> None:
    """Checks that need the number of clients (known once the data is listed or split)."""
    clients = f"{num_clients} clients of {config.data}"
    if len(config.ranks) not in (1, num_clients):
        raise ConfigError(f"'ranks' lists {len(config.ranks)} ranks for the {clients}; "
                          "give one rank for all or one per client")
    if config.clients_per_round is not None and config.clients_per_round > num_clients:
        raise ConfigError(f"'clients_per_round' is {config.clients_per_round} but there are only the {clients}")
    if config.min_clients > config.sampled_per_round(num_clients):
        raise ConfigError(f"'min_clients' is {config.min_clients} but only {config.sampled_per_round(num_clients)} "
                          f"of the {clients} are sampled per round: every round would be skipped")


def check_ranks_fit(config: RunConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """A rank above min(d, n) of an adapted module cannot be trained meaningfully."""
    smallest = min(min(shape) for shape in shapes.values())
    too_large = [rank for rank in config.ranks if rank > smallest]
    if too_large:
        module = min(shapes, key=lambda name: min(shapes[name]))
        raise ConfigError(f"'ranks' {too_large} exceed min(d, n) = {smallest} of target module {module!r}")


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """Local paths made absolute, so the run folder means the same from any working directory
    (a resumed run, Flower's app processes); Hugging Face ids are left as they are."""
    keys = ("model", "data", "test_data", "mmlu", "root_certificates")
    return config.replace(**{key: str(Path(value).resolve()) for key in keys
                             if (value := getattr(config, key)) is not None and Path(value).exists()})


def save_config(config: RunConfig, path: Path) -> None:
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")


def load_saved_config(path: Path) -> RunConfig:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no saved configuration; is this a fedlora run folder?") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON: {error}") from None
    return build_config(values, source=str(path))
