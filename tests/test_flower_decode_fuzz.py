"""Random replies into the server's decoding: a rejection (CodecError, AggregationError) every
time, never another exception. A SuperNode's reply is bytes from a machine the server does not
control; Flower checks only that its records hold record types."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora.aggregation import AggregationError, ClientUpdate, LoraFactors
from fedlora.engine.config import build_config
from fedlora.engine.setup import prepare_run
from fedlora.engine.task import ClientResult
from fedlora.engine.gate import admit
from fedlora.runtime.flower.wire import CodecError, decode_node_state, decode_result, encode_node_state, \
    encode_result

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RANK = 2
#: the modules tiny-llama adapts (q_proj, v_proj of its layers), two of them named here
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
RECORD_NAMES = ["metrics", "result", "update", "update.scale", "node", "extra"]
METRIC_KEYS = ["num-examples", "train-loss", "steps", "seconds", "replica-round", "other"]
CONFIG_KEYS = ["client-id", "partition-id", "replica-round", *MODULES, "model.layers.9.self_attn.k_proj"]
ARRAY_KEYS = [f"{module}.{name}" for module in [*MODULES, "model.layers.9.self_attn.k_proj"]
              for name in "AB"] + ["junk"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Federation on tiny-llama, configured for round 1: the checks a reply meets."""
    folder = tmp_path_factory.mktemp("clients")
    records = [{"instruction": f"q{i}", "response": f"a{i}", "category": "c"} for i in range(4)]
    for client in range(2):
        (folder / f"local_training_{client}.json").write_text(json.dumps(records))
    config = build_config({"model": "tiny-llama", "data": str(folder), "rounds": 1, "local_steps": 1,
                           "batch_size": 2, "max_length": 16, "ranks": [RANK], "max_examples": 10**6})
    federation = prepare_run(config, tmp_path_factory.mktemp("run"), log=lambda message: None).federation
    task = federation.configure_train(1)[0]
    assert set(MODULES) < set(federation.shapes)
    return federation, task


def honest_reply(federation, task) -> RecordDict:
    generator = torch.Generator().manual_seed(0)
    scale = federation.config.scale_for(task.plan.rank)
    factors = {module: LoraFactors(torch.randn(task.plan.rank, n, generator=generator),
                                   torch.randn(d, task.plan.rank, generator=generator), scale)
               for module, (d, n) in federation.shapes.items()}
    return encode_result(ClientResult(ClientUpdate(factors, 7, task.client_id), 1.5, 2, 0.1), replica_round=0)


metric_values = st.one_of(
    st.integers(min_value=-2**63, max_value=2**63 - 1), st.floats(),
    st.lists(st.integers(min_value=-2**63, max_value=2**63 - 1), max_size=3),
    st.lists(st.floats(), max_size=3))
config_values = st.one_of(
    metric_values, st.booleans(), st.text(max_size=12), st.binary(max_size=12),
    st.lists(st.text(max_size=5), max_size=3), st.lists(st.booleans(), max_size=3))


def npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros(2))
    return buffer.getvalue()


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", b"not an array")
    return buffer.getvalue()


DTYPES = ["<f4", "<f8", "<f2", ">f4", "<i4", "|i1", "|u1", "|b1", "<c8", "<U2", "<M8[s]", "<m8[s]", "|V4",
          [("a", "<f4"), ("b", "<i2")]]
shapes = st.lists(st.integers(min_value=0, max_value=6), max_size=3).map(tuple)


@st.composite
def numpy_arrays(draw) -> Array:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(shapes)
    raw = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize,
                         max_size=int(np.prod(shape)) * dtype.itemsize))
    values = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if draw(st.booleans()) and values.ndim == 2:
        values = np.asfortranarray(values)
    return Array.from_numpy_ndarray(values)


raw_arrays = st.builds(
    lambda dtype, shape, stype, data: Array(dtype=dtype, shape=shape, stype=stype, data=data),
    st.text(max_size=8), shapes, st.sampled_from(["numpy.ndarray", "torch.Tensor", ""]) | st.text(max_size=8),
    st.binary(max_size=64) | st.sampled_from([npz_bytes(), zip_bytes(), b"\x93NUMPY", b"\x80\x04K\x01."]))
arrays = numpy_arrays() | raw_arrays


@st.composite
def mutations(draw) -> list[tuple]:
    """A few edits of an honest reply: records dropped, replaced or retyped; values and arrays
    replaced, added or removed."""
    edits = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 4]))):
        kind = draw(st.sampled_from(["drop", "retype", "metric", "config", "array", "drop-array", "recast"]))
        record = draw(st.sampled_from(RECORD_NAMES))
        if kind in ("drop", "retype"):
            edits.append((kind, record, draw(st.sampled_from(["array", "config", "metric"]))))
        elif kind == "metric":
            edits.append((kind, "metrics", draw(st.sampled_from(METRIC_KEYS)), draw(metric_values)))
        elif kind == "config":
            edits.append((kind, draw(st.sampled_from(["result", "update.scale", "node"])),
                          draw(st.sampled_from(CONFIG_KEYS)), draw(config_values)))
        elif kind == "array":
            edits.append((kind, "update", draw(st.sampled_from(ARRAY_KEYS)), draw(arrays)))
        elif kind == "recast":  # an honest array changed a little, so the update's checks are reached
            edits.append((kind, "update", draw(st.sampled_from(ARRAY_KEYS[:4])), draw(st.sampled_from(sorted(RECASTS)))))
        else:
            edits.append((kind, "update", draw(st.sampled_from(ARRAY_KEYS))))
    return edits


RECASTS = {
    "float64": lambda a: a.astype(np.float64), "float16": lambda a: a.astype(np.float16),
    "int32": lambda a: a.astype(np.int32), "bool": lambda a: a > 0, "complex": lambda a: a.astype(np.complex64),
    "nan": lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a).astype(a.dtype),
    "inf": lambda a: np.full_like(a, np.inf), "huge": lambda a: np.full_like(a, 3e38),
    "transposed": lambda a: a.T.copy(), "fortran": np.asfortranarray, "row": lambda a: a[:1],
    "column": lambda a: a[:, :1], "empty": lambda a: a[:0], "flat": np.ravel, "cube": lambda a: a[None],
    "rank-10x": lambda a: np.tile(a, (10, 1)) if a.shape[0] == RANK else np.tile(a, (1, 10)),
}


EMPTY = {"array": ArrayRecord, "config": ConfigRecord, "metric": MetricRecord}


def mutated(content: RecordDict, edits: list[tuple]) -> RecordDict:
    honest = {key: array.numpy() for key, array in content.array_records["update"].items()}
    for kind, record, *rest in edits:
        if kind == "drop":
            content.pop(record, None)
        elif kind == "retype":
            content[record] = EMPTY[rest[0]]()
        elif kind == "drop-array":
            if record in content.array_records:
                content.array_records[record].pop(rest[0], None)
        elif kind == "recast":
            if record in content.array_records:
                content.array_records[record][rest[0]] = Array.from_numpy_ndarray(RECASTS[rest[1]](honest[rest[0]]))
        else:
            want = {"metric": MetricRecord, "config": ConfigRecord, "array": ArrayRecord}[kind]
            if not isinstance(content.get(record), want):
                content[record] = want()
            content[record][rest[0]] = rest[1]
    return content


def server_side(federation, task, content: RecordDict) -> None:
    """What the ServerApp does with a train reply: decode it, check it against its task (the
    Federation's own checks), add it to the round's aggregate."""
    result, _ = decode_result(content)
    update = admit(result.update, task, federation.shapes, federation.config)
    accumulator = federation.method.accumulator([(task.client_id, dict.fromkeys(federation.shapes, task.plan.rank))])
    accumulator.add(update)
    accumulator.result()


@FUZZ
@given(edits=mutations())
def test_a_mangled_train_reply_is_rejected_or_aggregated_never_a_crash(server, edits):
    try:
        server_side(*server, mutated(honest_reply(*server), edits))
        event("aggregated")
    except (CodecError, AggregationError) as error:
        event(f"{type(error).__name__}: {getattr(error, 'rule', 'record')}")


@FUZZ
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), config_values, max_size=4), st.booleans())
def test_a_mangled_node_state_is_a_codec_error(values, retype):
    content = encode_node_state(1, 2)
    content["node"] = MetricRecord() if retype else ConfigRecord(values)
    try:
        partition, replica_round = decode_node_state(content)
    except CodecError:
        return
    assert type(partition) is int and type(replica_round) is int and partition >= 0 and replica_round >= 0


def test_the_honest_reply_passes(server):
    server_side(*server, honest_reply(*server))
