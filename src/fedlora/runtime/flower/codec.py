"""Everything that crosses the Flower boundary, as records: factors, tasks, results, settings.

Factors travel as fp32 ``ArrayRecord``s keyed ``"<module>.A"`` / ``"<module>.B"``; their
scales travel in a ``ConfigRecord`` under the same name with a ``.scale`` suffix, so any
mix of ranks and shapes round-trips bit-exactly. A train instruction carries the
:class:`ClientTask` plus the :class:`Catchup` (base updates the client's replica still has to
merge); a train reply carries the :class:`ClientResult` plus the round the replica is now
merged through.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora.aggregation import ClientUpdate, GlobalUpdate, LoraFactors
from fedlora.engine.task import ClientResult, ClientTask
from fedlora.errors import FedloraError

#: (round, what that round merged into the base weights), oldest first
BaseUpdates = Sequence[tuple[int, GlobalUpdate]]

#: half-precision factors are widened to fp32 without loss; anything else is refused
_LOSSLESS_TO_FP32 = (torch.float32, torch.bfloat16, torch.float16)

#: query actions of the ClientApp (message types ``query.identify`` / ``query.sync``)
IDENTIFY_ACTION = "identify"
SYNC_ACTION = "sync"

TASK_KEY = "task"
START_KEY = "start"
UPDATE_KEY = "update"
METRICS_KEY = "metrics"
RESULT_KEY = "result"
NODE_KEY = "node"
CATCHUP_KEY = "catchup"
_BASE_UPDATE_PREFIX = "base-update."
_SCALE_SUFFIX = ".scale"


class CodecError(FedloraError):
    """A record that does not hold what this codec wrote; names the record and key."""


def _record(records: Mapping[str, Any], key: str) -> Any:
    try:
        return records[key]
    except KeyError:
        raise CodecError(f"message lacks the {key!r} record") from None


def _reader(record: Mapping[str, Any], record_name: str) -> Callable[[str], Any]:
    """``read(key)``: the value under ``key``, or a CodecError naming the record and key."""
    def read(key: str) -> Any:
        try:
            return record[key]
        except KeyError:
            raise CodecError(f"{record_name} lacks {key!r}") from None
    return read


# --- factors -----------------------------------------------------------------------------

def _fp32(tensor: torch.Tensor, module: str, name: str) -> torch.Tensor:
    if tensor.dtype not in _LOSSLESS_TO_FP32:
        raise CodecError(f"module {module!r}: factor {name} has dtype {tensor.dtype}; "
                         "only fp32 (or losslessly widened fp16/bf16) factors travel")
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()


def factors_to_records(factors: Mapping[str, LoraFactors]) -> tuple[ArrayRecord, ConfigRecord]:
    """``{module: LoraFactors}`` → (fp32 ArrayRecord of A and B, ConfigRecord of scales)."""
    arrays = ArrayRecord()
    scales = ConfigRecord()
    for module, f in factors.items():
        arrays[f"{module}.A"] = Array.from_numpy_ndarray(_fp32(f.A, module, "A").numpy())
        arrays[f"{module}.B"] = Array.from_numpy_ndarray(_fp32(f.B, module, "B").numpy())
        scales[module] = float(f.scale)
    return arrays, scales


def factors_from_records(arrays: ArrayRecord, scales: ConfigRecord) -> dict[str, LoraFactors]:
    """Inverse of :func:`factors_to_records`; module order follows the scales record."""
    factors = {}
    for module, scale in scales.items():
        try:
            A, B = (arrays[f"{module}.{name}"].numpy() for name in ("A", "B"))
        except KeyError as err:
            raise CodecError(f"module {module!r}: factor {err} missing from the ArrayRecord") from None
        # copy: the arrays are read-only views of the received bytes
        factors[module] = LoraFactors(torch.from_numpy(A.copy()), torch.from_numpy(B.copy()),
                                      float(scale))
    return factors


def put_factors(content: RecordDict, key: str, factors: Mapping[str, LoraFactors]) -> None:
    """Store ``factors`` in ``content`` under ``key`` (arrays) and ``key.scale`` (scales)."""
    content[key], content[key + _SCALE_SUFFIX] = factors_to_records(factors)


def get_factors(content: RecordDict, key: str) -> dict[str, LoraFactors] | None:
    """The factors :func:`put_factors` stored under ``key``; None where there are none."""
    if key not in content.array_records:
        return None
    try:
        scales = content.config_records[key + _SCALE_SUFFIX]
    except KeyError:
        raise CodecError(f"record {key!r} has no {key + _SCALE_SUFFIX!r} ConfigRecord") from None
    return factors_from_records(content.array_records[key], scales)


def wire_bytes(content: RecordDict) -> int:
    """Bytes Flower transmits for the arrays in ``content`` (data plus array headers)."""
    return sum(record.count_bytes() for record in content.array_records.values())


# --- tasks and catch-up --------------------------------------------------------------------

#: ClientTask fields that travel as ConfigRecord scalars; their types round-trip unchanged
_TASK_SCALARS = tuple(field.name for field in fields(ClientTask)
                      if field.name not in ("trainable", "start"))


def _config_key(field_name: str) -> str:
    return field_name.replace("_", "-")


def encode_task(task: ClientTask, catchup: Catchup) -> RecordDict:
    """A train instruction: the task, its start factors and the base updates to merge first."""
    config = ConfigRecord({_config_key(name): getattr(task, name) for name in _TASK_SCALARS})
    config["trainable"] = sorted(task.trainable)
    content = RecordDict({TASK_KEY: config})
    if task.start is not None:
        put_factors(content, START_KEY, task.start)
    put_catchup(content, catchup)
    return content


def decode_task(content: RecordDict) -> ClientTask:
    """The :class:`ClientTask` of a train instruction made by :func:`encode_task`."""
    value = _reader(_record(content.config_records, TASK_KEY), f"record {TASK_KEY!r}")
    return ClientTask(**{name: value(_config_key(name)) for name in _TASK_SCALARS},
                      trainable=frozenset(value("trainable")), start=get_factors(content, START_KEY))


@dataclass(frozen=True)
class Catchup:
    """What a replica merged through ``since`` must merge first: the base ``updates`` of the
    rounds after ``since``, oldest first; then it is merged through ``through``."""

    since: int
    through: int
    updates: BaseUpdates = ()

    def __post_init__(self) -> None:
        rounds = [server_round for server_round, _ in self.updates]
        if rounds != sorted(set(rounds)) or any(not self.since < r <= self.through for r in rounds):
            raise CodecError(f"base updates of rounds {rounds} are not strictly increasing "
                             f"within ({self.since}, {self.through}]")


def put_catchup(content: RecordDict, catchup: Catchup) -> None:
    """Store a catch-up: its bounds and rounds in one ConfigRecord, each update's factors and
    residual under ``base-update.<round>.factors`` / ``.residual``."""
    content[CATCHUP_KEY] = ConfigRecord({
        "since": catchup.since, "through": catchup.through,
        "rounds": [server_round for server_round, _ in catchup.updates],
        "merge": [update.merge for _, update in catchup.updates],
    })
    for server_round, update in catchup.updates:
        put_factors(content, f"{_BASE_UPDATE_PREFIX}{server_round}.factors", update.factors)
        put_factors(content, f"{_BASE_UPDATE_PREFIX}{server_round}.residual", update.residual)


def get_catchup(content: RecordDict) -> Catchup:
    """The catch-up of a train instruction or a sync message."""
    value = _reader(_record(content.config_records, CATCHUP_KEY), f"record {CATCHUP_KEY!r}")
    updates = []
    for server_round, merge in zip(value("rounds"), value("merge"), strict=True):
        prefix = f"{_BASE_UPDATE_PREFIX}{server_round}"
        factors, residual = (get_factors(content, f"{prefix}.{part}") for part in ("factors", "residual"))
        if factors is None or residual is None:
            raise CodecError(f"base update of round {server_round} is listed but not attached")
        updates.append((server_round, GlobalUpdate(factors=factors, merge=merge, residual=residual)))
    return Catchup(since=value("since"), through=value("through"), updates=tuple(updates))


# --- results -------------------------------------------------------------------------------

def encode_result(result: ClientResult, *, replica_round: int) -> RecordDict:
    """A train reply: the update's factors, its metrics and the replica's merged round."""
    content = RecordDict({
        METRICS_KEY: MetricRecord({
            "num-examples": result.update.num_examples,
            "train-loss": float(result.train_loss),
            "steps": result.steps,
            "seconds": float(result.seconds),
            "replica-round": replica_round,
        }),
        RESULT_KEY: ConfigRecord({"client-id": result.update.client_id}),
    })
    put_factors(content, UPDATE_KEY, result.update.factors)
    return content


def decode_result(content: RecordDict) -> tuple[ClientResult, int]:
    """(the :class:`ClientResult`, the round the sender's replica is merged through)."""
    metric = _reader(_record(content.metric_records, METRICS_KEY), f"record {METRICS_KEY!r}")
    client_id = _reader(_record(content.config_records, RESULT_KEY), f"record {RESULT_KEY!r}")("client-id")
    factors = get_factors(content, UPDATE_KEY)
    if factors is None:
        raise CodecError(f"train reply lacks the {UPDATE_KEY!r} record")
    update = ClientUpdate(factors=factors, num_examples=int(metric("num-examples")),
                          client_id=str(client_id))
    result = ClientResult(update=update, train_loss=float(metric("train-loss")),
                          steps=int(metric("steps")), seconds=float(metric("seconds")))
    return result, int(metric("replica-round"))


def encode_node_state(partition_id: int, replica_round: int) -> RecordDict:
    """An identify or sync reply: the node's partition and the round its replica is merged through."""
    return RecordDict({NODE_KEY: ConfigRecord({"partition-id": partition_id,
                                               "replica-round": replica_round})})


def decode_node_state(content: RecordDict) -> tuple[int, int]:
    """(partition id, replica round) of :func:`encode_node_state`."""
    value = _reader(_record(content.config_records, NODE_KEY), f"record {NODE_KEY!r}")
    return int(value("partition-id")), int(value("replica-round"))


# --- run and node configuration -------------------------------------------------------------

def resolve_factory(reference: str) -> Callable[..., Any]:
    """The callable a ``"package.module:attribute"`` reference names."""
    module, _, attribute = reference.partition(":")
    if not module or not attribute:
        raise CodecError(f"factory reference {reference!r} must look like 'package.module:name'")
    target: Any = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


@dataclass(frozen=True)
class AppSettings:
    """The Flower app's run config (``[tool.flwr.app.config]``), shared by both apps.

    ``federation_factory(run_dir)`` builds the server's Federation (the run folder is on the
    server's machine); ``client_factory(settings, node)`` (node: :class:`NodeSettings`) builds
    ``(trainer, examples)`` on a node, which may be another machine: what it needs to know of
    the run travels in ``run_config`` (the run's configuration as JSON).
    """

    run_dir: str
    federation_factory: str
    client_factory: str
    #: seconds a round (or the final sync) waits for replies before counting failures
    round_timeout: float = 600.0
    #: seconds the first round waits for every partition's SuperNode to identify itself
    connect_timeout: float = 120.0
    run_config: str = "{}"

    def to_run_config(self) -> dict[str, str | float]:
        return {"run-dir": self.run_dir, "federation-factory": self.federation_factory,
                "client-factory": self.client_factory, "round-timeout": self.round_timeout,
                "connect-timeout": self.connect_timeout, "fedlora-config": self.run_config}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppSettings:
        value = _reader(run_config, "run config")
        return cls(run_dir=str(value("run-dir")),
                   federation_factory=str(value("federation-factory")),
                   client_factory=str(value("client-factory")),
                   round_timeout=float(value("round-timeout")),
                   connect_timeout=float(value("connect-timeout")),
                   run_config=str(value("fedlora-config")))


def run_model_cache(run_dir: Path | str) -> Path:
    """A run folder's model cache: the SuperNodes of a local deployment share it, and a
    ServerApp whose run folder has one loads its model through it."""
    return Path(run_dir) / "model-cache"


@dataclass(frozen=True)
class NodeSettings:
    """A SuperNode's ``--node-config``: its partition, where its data is, where it keeps state."""

    partition_id: int
    data: str = ""
    #: the replica's base-update log lives in ``state_dir/run-<run id>``
    state_dir: str = ""
    #: where a GGUF model is kept dequantised between messages; empty: dequantise for every one
    model_cache: str = ""
    #: torch intra-op threads of the node's ClientApp (so that nodes sharing a machine do not
    #: oversubscribe its cores); 0: torch's default, every core
    threads: int = 0

    def to_node_config(self) -> str:
        """The ``--node-config`` argument: space-separated ``key=<TOML value>`` pairs."""
        return (f"partition-id={self.partition_id} data={_quoted(self.data, 'data')} "
                f"state-dir={_quoted(self.state_dir, 'state-dir')} "
                f"model-cache={_quoted(self.model_cache, 'model-cache')} threads={self.threads}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        partition_id = int(_reader(node_config, "node config")("partition-id"))
        flwr_home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
        state_dir = str(node_config.get("state-dir") or
                        flwr_home / "fedlora" / f"partition-{partition_id}")
        return cls(partition_id, str(node_config.get("data", "")), state_dir,
                   str(node_config.get("model-cache", "")), int(node_config.get("threads", 0)))


def _quoted(value: str, key: str) -> str:
    """``value`` as a TOML string Flower's ``key=value`` parser accepts: it takes a quoted value
    up to the next quote of the same kind, so a JSON string if there is no ``"``, else a
    literal string."""
    if '"' not in value:
        return json.dumps(value)
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    raise CodecError(f"node config {key} {value!r} holds both quote kinds (or a newline and a quote)")
