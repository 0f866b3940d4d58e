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
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from fedlora.aggregation.registry import DEFAULT_METHOD
from fedlora.errors import FedloraError
from fedlora.imports import resolve

DEFAULT_DATA = "../shared/data/dolly-10clients"
#: Used when the shared data folder is absent (a user's own machine): split by Dirichlet.
HUB_FALLBACK_DATA = "databricks/databricks-dolly-15k"
RUNTIMES = ("inprocess", "flower")
#: the experiment trackers ``report_to`` may name (fedlora.trackers), and the package each needs
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
QUANTIZATION_INSTALL = "pip install 'fedlora[quantization]'"
#: a run folder's configuration, written before any work so that even round 0 can resume
CONFIG_FILE = "config.json"


class ConfigError(FedloraError):
    """A configuration value that cannot be run; names the source and the key."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
           choices: tuple | str | None = None, minimum: float | None = None, positive: bool = False) -> Any:
    """A RunConfig field with what validation and the CLI derive from it.

    ``help`` is the CLI's help text; ``choices`` the allowed values, given as a tuple or as a
    ``"module:NAME"`` reference to the tuple its implementation defines (resolved when a value
    is validated, so declaring it imports nothing heavy); ``minimum``: values ≥ it;
    ``positive``: finite values > 0. None passes every rule where the field allows None.
    """
    metadata = {"help": help, "choices": choices, "minimum": minimum, "positive": positive}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Everything a run needs. Keys of the TOML file are these field names."""

    # model
    model: str = option("smollm2-135m", "smollm2-135m, tiny-llama, a HF id or a local dir")
    gguf_file: str | None = option(None, "GGUF file inside --model's directory")
    device: str | None = option(None, "torch device (default: cuda when available, else cpu)")
    dtype: str | None = option(None, "base weights' dtype (default: float32 on cpu, bfloat16 on cuda)",
                               choices="fedlora.models:DTYPES")
    trust_remote_code: bool = option(False, "let transformers run the model repository's code")
    quantization: str | None = option(None, "QLoRA: load the base's linear layers quantised by bitsandbytes; "
                                            "merges go into a full-precision residual beside them",
                                      choices="fedlora.quantization:QUANTIZATIONS")
    quantization_compute_dtype: str | None = option(None, "dtype a 4-bit layer computes in (default: the "
                                                          "model's dtype)",
                                                    choices="fedlora.models:DTYPES")
    double_quantization: bool = option(False, "4-bit: quantise the per-block scales too (about 0.4 bits per "
                                              "weight less)")
    # data
    data: str = option(DEFAULT_DATA, "dir of local_training_*.json(l), a .json/.jsonl file or a HF id")
    test_data: str | None = option(None, "held-out records for eval loss")
    mmlu: str | None = option(None, "MMLU file in FLoRA's format")
    clients: int | None = option(None, "number of clients (first N files, or N splits)", positive=True)
    partition: str = option("dirichlet", "how one dataset is split into clients",
                            choices="fedlora.data.partition:PARTITIONS")
    dirichlet_alpha: float = option(0.5, "Dirichlet concentration of the split (smaller: more skewed)",
                                    positive=True)
    partition_by: str = option("category", "top-level record field the Dirichlet split skews")
    min_partition_size: int = option(10, "fewest records a Dirichlet client may get", minimum=1)
    max_length: int = option(256, "tokens per example; longer ones are truncated", minimum=1)
    prompt_format: str | None = option(None, "alpaca, or chat (the tokenizer's chat template; needed for "
                                             "conversations); default: chat where the tokenizer has a template",
                                       choices="fedlora.data.prompts:PROMPT_FORMATS")
    validation_fraction: float = option(0.02, "share of each client's records held out of its training for "
                                              "val_loss (seeded, at least one record; 0: none)", minimum=0)
    # federation
    method: str = option(DEFAULT_METHOD, "aggregation method or baseline (see `fedlora methods`)")
    method_options: dict[str, Any] = option(help="the method's options, as JSON on the command line",
                                            factory=dict)
    rounds: int = option(3, "federated rounds", minimum=1)
    fraction: float = option(1.0, "fraction of clients sampled per round, in (0, 1]", positive=True)
    clients_per_round: int | None = option(None, "clients sampled per round (overrides fraction)", positive=True)
    min_clients: int = option(1, "skip a round with fewer usable updates", minimum=1)
    weighting: str = option("examples", "how a round weighs its clients: examples (their dataset sizes), uniform, or "
                                        "processed (the examples each processed this round)",
                            choices="fedlora.aggregation.factors:WEIGHTINGS")
    # LoRA
    ranks: list[int] = option(help="LoRA rank for all clients, or one per client: 64,32,16",
                              factory=lambda: [16])
    alpha: float | None = option(None, "LoRA alpha for all clients (default alpha_ratio × rank)", positive=True)
    alpha_ratio: float = option(2.0, "alpha = alpha_ratio × rank where alpha is not set", positive=True)
    use_rslora: bool = option(False, "rank-stabilised scale alpha/√r instead of alpha/r")
    target_modules: list[str] = option(help="adapted linear layers: q_proj,v_proj",
                                       factory=lambda: ["q_proj", "v_proj"])
    # client training
    local_steps: int | None = option(10, "optimizer steps per client per round", positive=True)
    local_epochs: float | None = option(None, "epochs per client per round, instead of steps", positive=True)
    batch_size: int = option(4, "examples per optimizer step (per accumulation step)", minimum=1)
    grad_accum: int = option(1, "gradient accumulation steps per optimizer step", minimum=1)
    lr: float = option(3e-4, "AdamW learning rate", positive=True)
    weight_decay: float = option(0.0, "AdamW weight decay", minimum=0)
    seed: int = option(0, "seeds sampling, initialisation and batch order")
    gradient_checkpointing: bool = option(False, "recompute each decoder layer's activations in the backward "
                                                 "pass: less memory, about a third more compute")
    autocast: str | None = option(None, "bfloat16: client forward passes under torch.autocast (matmuls in "
                                        "bf16, weights and LoRA factors keep their dtypes)",
                                  choices="fedlora.engine.compute:AUTOCAST_DTYPES")
    #: sample-level DP-SGD on every client (engine/privacy.py); empty: off
    dp: dict[str, Any] = option(help="DP-SGD: {noise_multiplier | target_epsilon, max_grad_norm, delta[, seed]}",
                                factory=dict)
    #: client-level DP-FedAvg at the server (aggregation/dp.py); empty: off
    client_dp: dict[str, Any] = option(help="DP-FedAvg, for the methods `fedlora methods` marks client-level DP: "
                                            "{noise_multiplier | target_epsilon, clip_norm, delta[, seed]}",
                                       factory=dict)
    packing: bool = option(True, "pack each micro-batch's sequences in one row without padding where "
                                 "the model allows it (else padded batches, with a notice)")
    # update validation
    max_update_norm: float | None = option(None, "reject updates with larger ‖ΔW‖_F", positive=True)
    max_examples: int | None = option(None, "reject updates claiming more examples", positive=True)
    # evaluation
    eval_batch_size: int = option(8, "examples per evaluation batch", minimum=1)
    test_limit: int | None = option(None, "evaluate loss on the first N test records", positive=True)
    eval_every: int = option(1, "test loss every K rounds (round 0 and the final round always)", minimum=1)
    val_every: int = option(0, "validation loss every K rounds (0: the final round only, where tuning reads it)",
                            minimum=0)
    mmlu_limit: int | None = option(None, "score the first N MMLU questions (0: no MMLU)", minimum=0)
    mmlu_every: int = option(0, "MMLU every K rounds (default: final round only)", minimum=0)
    generation_limit: int = option(8, "answer the first N held-out records by greedy generation, scored "
                                      "with ROUGE-L and exact match (0: none)", minimum=0)
    generation_every: int = option(0, "generation every K rounds (round 0 and the final round always)", minimum=0)
    max_new_tokens: int = option(64, "tokens generated per answer at most (it stops at EOS)", minimum=1)
    eval_tasks: list[str] = option(help="lm-evaluation-harness tasks run on the global model: fedlora_mmlu, "
                                        "fedlora_generation or any lm-eval task whose data is available offline",
                                   factory=list)
    tasks_every: int = option(0, "eval_tasks every K rounds (default: the final round only)", minimum=0)
    tasks_limit: int | None = option(None, "documents per lm-eval task (default: all)", positive=True)
    # runtime and outputs
    runtime: str = option("inprocess", "inprocess (default) or flower", choices=RUNTIMES)
    superlink: str | None = option(None, "HOST:PORT of an existing Flower SuperLink")
    root_certificates: str | None = option(None, "CA certificate of --superlink (TLS)")
    #: the clients' records stay on the SuperNodes (each started with its own ``data=``): the
    #: server reads none, knows the clients by partition id ("0" … "clients-1") and their sizes
    #: only from their updates
    data_on_nodes: bool = option(False, "with --superlink: the SuperNodes hold the clients' records, "
                                        "the server reads none")
    client_timeout: float = option(600.0, "seconds a round waits for a client's reply", positive=True)
    out: str = option("runs/latest", "run folder")
    report_to: list[str] = option(help="experiment trackers to log to: tensorboard,mlflow,wandb (any of them)",
                                  factory=list)

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
    if expected is list and key in ("ranks", "target_modules", "report_to", "eval_tasks") and isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
        if key == "ranks":
            try:
                value = [int(part) for part in value]
            except ValueError:
                raise ConfigError(f"{source}: 'ranks' must be integers like 64,32,16, got {value}") from None
    if expected is dict and isinstance(value, str):  # JSON from the command line
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source}: {key!r} must be a JSON object, got {value!r} ({error.msg})") from None
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


def read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """The TOML document at ``path``; a ConfigError naming the file when it is absent or invalid."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML file (optional), then apply ``overrides`` (CLI flags that were given)."""
    config = RunConfig()
    if path is not None:
        path = Path(path)
        config = build_config(read_toml(path), source=str(path))
    return build_config(overrides or {}, source="command line", base=config)


def allowed_values(choices: tuple | str) -> tuple:
    """A field's ``choices``: the tuple, or the tuple a ``"module:NAME"`` reference names."""
    return tuple(resolve(choices)) if isinstance(choices, str) else choices


def check_field_rules(config: RunConfig, fail: Callable[[str, str], None]) -> None:
    """The rules each field declares in its :func:`option` metadata."""
    for spec in dataclasses.fields(config):
        value, rules = getattr(config, spec.name), spec.metadata
        if value is None or isinstance(value, (bool, list, dict)):
            continue
        if rules.get("choices") is not None and value not in (allowed := allowed_values(rules["choices"])):
            fail(spec.name, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if rules.get("positive") and not (value > 0 and math.isfinite(value)):
            fail(spec.name, f"must be a positive number, got {value}")
        if rules.get("minimum") is not None and not value >= rules["minimum"]:
            fail(spec.name, f"must be ≥ {rules['minimum']}, got {value}")


def validate(config: RunConfig, source: str = "config") -> None:
    """Reject impossible values before any model or data is loaded."""
    from fedlora.aggregation import aggregator_class, available_aggregators  # torch: not at import
    from fedlora.engine.privacy import check_privacy

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key!r} {message}")

    check_field_rules(config, fail)
    if config.method not in available_aggregators():
        fail("method", f"is {config.method!r}; choose one of {', '.join(available_aggregators())}")
    method = aggregator_class(config.method)
    try:
        method.Options(**config.method_options)
    except (TypeError, ValueError) as error:
        fail("method_options", f"do not fit method {config.method!r}: {error}")
    if not config.ranks or any(rank < 1 for rank in config.ranks):
        fail("ranks", f"must be integers ≥ 1, got {config.ranks}")
    if config.fraction > 1:
        fail("fraction", f"must be in (0, 1], got {config.fraction}")
    if len(set(config.ranks)) > 1 and not method.heterogeneous_ranks:
        heterogeneous = [name for name in available_aggregators() if aggregator_class(name).heterogeneous_ranks]
        fail("ranks", f"are mixed ({config.ranks}) but {config.method!r} needs one rank for all "
                      f"clients; methods for heterogeneous ranks: {', '.join(heterogeneous)}")
    if not config.validation_fraction < 1:
        fail("validation_fraction", f"must be below 1 (a client must keep records to train on), "
                                    f"got {config.validation_fraction}")
    if (config.local_steps is None) == (config.local_epochs is None):
        fail("local_steps", "and 'local_epochs': set exactly one")
    if config.runtime not in method.runtimes:
        fail("method", f"{config.method!r} runs only with runtime {' or '.join(map(repr, method.runtimes))}")
    if config.data_on_nodes:
        if config.runtime != "flower" or config.superlink is None:
            fail("data_on_nodes", "needs runtime 'flower' and a 'superlink' whose SuperNodes hold the data")
        if config.clients is None:
            fail("clients", "must say how many SuperNodes hold data when 'data_on_nodes' is set")
        if config.local_epochs is not None:
            fail("local_epochs", "need each client's size, which the server does not read with "
                                 "'data_on_nodes': set 'local_steps' instead")
    if not config.target_modules:
        fail("target_modules", "must name at least one module")
    if config.client_dp and config.weighting != "examples":
        fail("weighting", f"is {config.weighting!r} but client-level DP weighs every client 1/clients_per_round "
                          "(other weights would change its sensitivity): leave it at 'examples'")
    check_trackers(config, fail)
    check_eval_tasks(config, fail)
    check_quantization(config, fail)
    check_privacy(config, fail)


def check_trackers(config: RunConfig, fail: Callable[[str, str], None]) -> None:
    """Every tracker ``report_to`` names is known and its package installed (looked up, not imported)."""
    for name in config.report_to:
        if name not in TRACKER_PACKAGES:
            fail("report_to", f"names {name!r}; choose among {', '.join(TRACKER_PACKAGES)}")
        if find_spec(TRACKER_PACKAGES[name]) is None:
            fail("report_to", f"names {name!r} but its package is not installed: pip install 'fedlora[{name}]'")


def check_eval_tasks(config: RunConfig, fail: Callable[[str, str], None]) -> None:
    """lm-eval is installed when tasks are named, and fedlora's own tasks have their inputs."""
    if not config.eval_tasks:
        return
    if find_spec("lm_eval") is None:
        fail("eval_tasks", "need lm-evaluation-harness: pip install 'lm-eval[hf]'")
    if "fedlora_mmlu" in config.eval_tasks and not config.mmlu:
        fail("eval_tasks", "name 'fedlora_mmlu', which scores the questions of the 'mmlu' file: give one")
    if "fedlora_generation" in config.eval_tasks and not config.generation_limit:
        fail("eval_tasks", "name 'fedlora_generation', which answers the first 'generation_limit' test records: "
                           "set it above 0")


def check_quantization(config: RunConfig, fail: Callable[[str, str], None]) -> None:
    """The quantisation options fit together and bitsandbytes is installed (looked up, not imported)."""
    options = [key for key in ("quantization_compute_dtype", "double_quantization") if getattr(config, key)]
    if options and config.quantization not in ("nf4", "fp4"):
        fail(options[0], f"is an option of 4-bit quantisation (nf4, fp4), and 'quantization' is "
                         f"{config.quantization!r}")
    if config.quantization is not None and find_spec("bitsandbytes") is None:
        fail("quantization", f"needs bitsandbytes, which is not installed: {QUANTIZATION_INSTALL}")


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


#: what a key added since a run folder was written meant for that run, where its default now differs
KEYS_BEFORE_THEY_EXISTED = {"prompt_format": "alpaca", "generation_limit": 0}


def load_saved_config(path: Path) -> RunConfig:
    """A run folder's configuration; a key it predates has the value the run was made with."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no saved configuration; is this a fedlora run folder?") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON: {error}") from None
    return build_config({**KEYS_BEFORE_THEY_EXISTED, **values}, source=str(path))
