"""Everything that crosses the Flower boundary, as records: factors, tasks, results, metrics.

Factors travel as fp32 ``ArrayRecord``s keyed ``"<module>.A"`` / ``"<module>.B"``; their
scales travel in a ``ConfigRecord`` under the same name with a ``.scale`` suffix, so any
mix of ranks and shapes round-trips bit-exactly. A message may carry only some factors (a
client's upload; a start without the factors the client keeps itself): the scales record then
also holds each module's ``[rank, d, n]`` and the receiver gets zeros for what stayed behind,
to fill with its own. A train instruction carries the :class:`ClientTask` plus the
:class:`Catchup` (base updates the client's replica still has to merge); a train reply carries
the :class:`ClientResult` plus the round the replica is now merged through. An evaluation
request carries a client's adapter as the server has it (plus a catch-up); its reply, the
metrics of the client's own model.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType

from fedlora.aggregation import ClientPlan, ClientUpdate, Drawn, GlobalUpdate, LoraFactors, Regularizer
from fedlora.aggregation.factors import CORE, FACTOR_NAMES, factor_names
from fedlora.engine.task import ClientResult, ClientTask
from fedlora.errors import FedloraError

#: (round, what that round merged into the base weights), oldest first
BaseUpdates = Sequence[tuple[int, GlobalUpdate]]

#: half-precision factors are widened to fp32 without loss; anything else is refused
_LOSSLESS_TO_FP32 = (torch.float32, torch.bfloat16, torch.float16)

#: query actions of the ClientApp (message types ``query.identify`` / ``.sync`` / ``.evaluate``)
IDENTIFY_ACTION = "identify"
SYNC_ACTION = "sync"
EVALUATE_ACTION = "evaluate"

TASK_KEY = "task"
START_KEY = "start"
FOLDED_KEY = "folded"
UPDATE_KEY = "update"
METRICS_KEY = "metrics"
RESULT_KEY = "result"
NODE_KEY = "node"
CATCHUP_KEY = "catchup"
EVALUATION_KEY = "evaluation"
ADAPTER_KEY = "adapter"
_BASE_UPDATE_PREFIX = "base-update."
_SCALE_SUFFIX = ".scale"
#: a module's [rank, d, n] in a scales record where a factor stays behind
_SHAPE_SUFFIX = ".shape"
#: elements a left-out factor pair may state: a rank-1024 adapter of a 65536-wide layer
_MAX_LEFT_BEHIND = 1024 * 2 * 65536


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


# Scalars a reply carries are checked by type: Python would turn 2.5 examples into 2 and a
# NaN step count into an exception, and a reply is bytes from a machine we do not control.

def _int(value: Any, what: str, *, minimum: int | None = 0) -> int:
    if type(value) is not int or (minimum is not None and value < minimum):
        bound = f" ≥ {minimum}" if minimum is not None else ""
        raise CodecError(f"{what} must be an integer{bound}, got {value!r}")
    return value


def _float(value: Any, what: str, *, finite: bool = True) -> float:
    if type(value) not in (int, float) or (finite and not math.isfinite(value)):
        raise CodecError(f"{what} must be a {'finite ' if finite else ''}number, got {value!r}")
    return float(value)


def _str(value: Any, what: str) -> str:
    if type(value) is not str:
        raise CodecError(f"{what} must be a string, got {value!r}")
    return value


# --- factors -----------------------------------------------------------------------------

def _fp32(tensor: torch.Tensor, module: str, name: str) -> torch.Tensor:
    if tensor.dtype not in _LOSSLESS_TO_FP32:
        raise CodecError(f"module {module!r}: factor {name} has dtype {tensor.dtype}; "
                         "only fp32 (or losslessly widened fp16/bf16) factors travel")
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()


def factors_to_records(factors: Mapping[str, LoraFactors],
                       names: frozenset[str] | None = None) -> tuple[ArrayRecord, ConfigRecord]:
    """``{module: LoraFactors}`` → (fp32 ArrayRecord of the ``names`` factors, by default all it
    holds, a core H included; ConfigRecord of scales, with each module's rank and dense shape
    where A or B stays behind)."""
    names = factor_names(dict(factors)) if names is None else names
    arrays = ArrayRecord()
    scales = ConfigRecord()
    for module, f in factors.items():
        for name in sorted(names):
            if (tensor := getattr(f, name)) is not None:
                arrays[f"{module}.{name}"] = Array.from_numpy_ndarray(_fp32(tensor, module, name).numpy())
        scales[module] = float(f.scale)
        if not set(FACTOR_NAMES) <= names:
            scales[module + _SHAPE_SUFFIX] = [f.rank, *f.shape]
    return arrays, scales


def _tensor(arrays: ArrayRecord, key: str) -> torch.Tensor:
    """The received array ``key`` as a tensor of its own dtype (the update's checks judge it).

    Read as the ``.npy`` bytes :meth:`Array.from_numpy_ndarray` writes and nothing else (no
    archives, no pickles); any array torch cannot hold is a CodecError.
    """
    try:
        array = arrays[key]
    except KeyError:
        raise CodecError(f"factor {key!r} missing from the ArrayRecord") from None
    if array.stype != SType.NUMPY:
        raise CodecError(f"array {key!r} is serialised as {array.stype!r}, not {SType.NUMPY!r}")
    try:
        values = np.lib.format.read_array(io.BytesIO(array.data), allow_pickle=False)
    # the .npy header is a Python literal from another machine: its parser fails in many ways
    except Exception as error:
        raise CodecError(f"array {key!r} is not a .npy array: {type(error).__name__}: {error}") from None
    try:
        return torch.from_numpy(np.ascontiguousarray(values))
    except (TypeError, ValueError) as error:  # strings, dates, records, foreign byte order
        raise CodecError(f"array {key!r} of dtype {values.dtype} cannot be a factor: {error}") from None


def factors_from_records(arrays: ArrayRecord, scales: ConfigRecord) -> dict[str, LoraFactors]:
    """Inverse of :func:`factors_to_records`; module order follows the scales record. A factor
    left behind comes back as zeros of the shape the record states: the receiver puts its own
    in its place (the server the start it sent, a client the factor it keeps). Arrays the
    scales do not name are refused, not ignored."""
    modules = [module for module in scales if not module.endswith(_SHAPE_SUFFIX)]
    expected = {f"{module}.{name}" for module in modules for name in (*FACTOR_NAMES, CORE)}
    stray = sorted(set(arrays) - expected)
    if stray:
        raise CodecError(f"ArrayRecord holds arrays of no module in the scales: {stray[:3]}")
    factors = {}
    for module in modules:
        tensors = {}
        for name in FACTOR_NAMES:
            key = f"{module}.{name}"
            if key in arrays:
                tensors[name] = _tensor(arrays, key)
            elif module + _SHAPE_SUFFIX in scales:
                tensors[name] = torch.zeros(_left_behind_shape(scales[module + _SHAPE_SUFFIX], module, name))
            else:
                raise CodecError(f"module {module!r}: factor {key!r} missing from the ArrayRecord")
        core = _tensor(arrays, f"{module}.{CORE}") if f"{module}.{CORE}" in arrays else None
        factors[module] = LoraFactors(tensors["A"], tensors["B"],
                                      _float(scales[module], f"module {module!r}: scale", finite=False), core)
    return factors


def _left_behind_shape(entry: Any, module: str, name: str) -> tuple[int, int]:
    """The shape of a factor a message leaves out, from its ``(rank, d, n)`` entry."""
    if type(entry) is not list or len(entry) != 3:
        raise CodecError(f"module {module!r}: shape entry must be [rank, d, n], got {entry!r}")
    rank, d, n = (_int(value, f"module {module!r}: shape", minimum=1) for value in entry)
    if rank * (d + n) > _MAX_LEFT_BEHIND:  # a stated shape is allocated before any check
        raise CodecError(f"module {module!r}: shape entry {entry} is too large for a LoRA factor")
    return (rank, n) if name == "A" else (d, rank)


def put_factors(content: RecordDict, key: str, factors: Mapping[str, LoraFactors],
                names: frozenset[str] | None = None) -> None:
    """Store the ``names`` factors of ``factors`` (by default all they hold) in ``content`` under
    ``key`` (arrays) and ``key.scale`` (scales)."""
    content[key], content[key + _SCALE_SUFFIX] = factors_to_records(factors, names)


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

#: ClientPlan fields that are sets of factor names: they travel as sorted lists
_PLAN_NAME_SETS = ("trainable", "uploads", "kept")
#: ClientTask fields that travel as ConfigRecord scalars; their types round-trip unchanged
_TASK_SCALARS = tuple(field.name for field in fields(ClientTask) if field.name != "plan")
#: task fields that default to None, absent from the record when unset
_OPTIONAL_TASK_SCALARS = frozenset(field.name for field in fields(ClientTask)
                                   if field.name in _TASK_SCALARS and field.default is None)


def _config_key(field_name: str) -> str:
    return field_name.replace("_", "-")


def encode_task(task: ClientTask, catchup: Catchup) -> RecordDict:
    """A train instruction: the task and its plan, the start factors but those the client keeps or
    draws itself, the factors it folds into its weights for the round, and the base updates to
    merge first."""
    plan = task.plan
    # an optional field travels only when set (a ConfigRecord holds no None)
    config = ConfigRecord({_config_key(name): getattr(task, name) for name in _TASK_SCALARS
                           if getattr(task, name) is not None})
    config.update({name: sorted(getattr(plan, name)) for name in _PLAN_NAME_SETS})
    config["rank"] = plan.rank
    if plan.regularizer is not None:
        config["regularizer"] = json.dumps({"term": plan.regularizer.term, "options": dict(plan.regularizer.options)})
    if plan.drawn is not None:
        config["drawn"] = json.dumps({"draw": plan.drawn.draw, "names": sorted(plan.drawn.names),
                                      "options": dict(plan.drawn.options)})
    if plan.adalora is not None:
        config["adalora"] = json.dumps(dict(plan.adalora))
    content = RecordDict({TASK_KEY: config})
    if plan.start is not None:
        put_factors(content, START_KEY, plan.start, plan.sent)
    if plan.folded:
        put_factors(content, FOLDED_KEY, plan.folded)
    put_catchup(content, catchup)
    return content


def decode_task(content: RecordDict) -> ClientTask:
    """The :class:`ClientTask` of a train instruction made by :func:`encode_task` (the factors
    the client keeps are zeros in its start, for it to fill from its store)."""
    record = _record(content.config_records, TASK_KEY)
    value = _reader(record, f"record {TASK_KEY!r}")
    regularizer = drawn = None
    if "regularizer" in record:
        regularizer = Regularizer(**json.loads(_str(value("regularizer"), "regularizer")))
    if "drawn" in record:
        spec = json.loads(_str(value("drawn"), "drawn"))
        drawn = Drawn(draw=spec["draw"], names=frozenset(spec["names"]), options=spec["options"])
    plan = ClientPlan(rank=value("rank"), **{name: frozenset(value(name)) for name in _PLAN_NAME_SETS},
                      start=get_factors(content, START_KEY), regularizer=regularizer, drawn=drawn,
                      folded=get_factors(content, FOLDED_KEY),
                      adalora=json.loads(_str(value("adalora"), "adalora")) if "adalora" in record else None)
    return ClientTask(**{name: value(_config_key(name)) for name in _TASK_SCALARS
                         if name not in _OPTIONAL_TASK_SCALARS or _config_key(name) in record}, plan=plan)


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

def encode_result(result: ClientResult, *, replica_round: int,
                  uploads: frozenset[str] | None = None) -> RecordDict:
    """A train reply: the update's ``uploads`` factors (the others come back as zeros, for the
    server to take from the start it sent), its metrics and the replica's merged round."""
    metrics = {"num-examples": result.update.num_examples, "steps": result.steps,
               "seconds": float(result.seconds), "replica-round": replica_round}
    if result.train_loss is not None:  # a withheld loss is sent as no key at all
        metrics["train-loss"] = float(result.train_loss)
    if result.update.num_processed is not None:
        metrics["num-processed"] = result.update.num_processed
    content = RecordDict({
        METRICS_KEY: MetricRecord(metrics),
        RESULT_KEY: ConfigRecord({"client-id": result.update.client_id}),
    })
    put_factors(content, UPDATE_KEY, result.update.factors, uploads)
    return content


def decode_result(content: RecordDict) -> tuple[ClientResult, int]:
    """(the :class:`ClientResult`, the round the sender's replica is merged through)."""
    metrics = _record(content.metric_records, METRICS_KEY)
    metric = _reader(metrics, f"record {METRICS_KEY!r}")
    client_id = _reader(_record(content.config_records, RESULT_KEY), f"record {RESULT_KEY!r}")("client-id")
    factors = get_factors(content, UPDATE_KEY)
    if factors is None:
        raise CodecError(f"train reply lacks the {UPDATE_KEY!r} record")
    # num-examples may be any integer: the update's checks reject a bad count under their rule
    processed = _int(metric("num-processed"), "num-processed", minimum=None) if "num-processed" in metrics else None
    update = ClientUpdate(factors=factors, num_examples=_int(metric("num-examples"), "num-examples", minimum=None),
                          client_id=_str(client_id, "client-id"), num_processed=processed)
    train_loss = _float(metric("train-loss"), "train-loss") if "train-loss" in metrics else None
    result = ClientResult(update=update, train_loss=train_loss,
                          steps=_int(metric("steps"), "steps"), seconds=_float(metric("seconds"), "seconds"))
    return result, _int(metric("replica-round"), "replica-round")


def encode_evaluation(client_id: str, server_round: int, adapter: Mapping[str, LoraFactors],
                      kept: frozenset[str], catchup: Catchup) -> RecordDict:
    """An evaluation request: the client's adapter as the server has it, less the factors the
    client keeps (it completes the adapter with its own), and the base updates to merge first."""
    content = RecordDict({EVALUATION_KEY: ConfigRecord({"client-id": client_id, "round": server_round,
                                                        "kept": sorted(kept)})})
    put_factors(content, ADAPTER_KEY, adapter, factor_names(dict(adapter)) - kept)
    put_catchup(content, catchup)
    return content


def decode_evaluation(content: RecordDict) -> tuple[str, int, dict[str, LoraFactors], Catchup]:
    """(client id, round, adapter with zeros for the kept factors, catch-up) of :func:`encode_evaluation`."""
    value = _reader(_record(content.config_records, EVALUATION_KEY), f"record {EVALUATION_KEY!r}")
    adapter = get_factors(content, ADAPTER_KEY)
    if adapter is None:
        raise CodecError(f"evaluation request lacks the {ADAPTER_KEY!r} record")
    return str(value("client-id")), int(value("round")), adapter, get_catchup(content)


def encode_metrics(metrics: Mapping[str, Any]) -> RecordDict:
    """An evaluation reply: the metrics, as JSON (they nest: MMLU per subject; floats round-trip exactly)."""
    return RecordDict({METRICS_KEY: ConfigRecord({"json": json.dumps(metrics)})})


def decode_metrics(content: RecordDict) -> dict:
    """The metrics of :func:`encode_metrics`."""
    return json.loads(_reader(_record(content.config_records, METRICS_KEY), f"record {METRICS_KEY!r}")("json"))


def encode_node_state(partition_id: int, replica_round: int) -> RecordDict:
    """An identify or sync reply: the node's partition and the round its replica is merged through."""
    return RecordDict({NODE_KEY: ConfigRecord({"partition-id": partition_id,
                                               "replica-round": replica_round})})


def decode_node_state(content: RecordDict) -> tuple[int, int]:
    """(partition id, replica round) of :func:`encode_node_state`."""
    value = _reader(_record(content.config_records, NODE_KEY), f"record {NODE_KEY!r}")
    return _int(value("partition-id"), "partition-id"), _int(value("replica-round"), "replica-round")
