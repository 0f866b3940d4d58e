"""Flower records ⇄ fedlora objects: bit-exact round trips through Flower's own serialisation."""

from __future__ import annotations

import pytest
import torch
from flwr.app import RecordDict
from flwr.common.config import parse_config_args

from fedlora.aggregation import ClientUpdate, GlobalUpdate, LoraFactors
from fedlora.aggregation import ClientPlan
from fedlora.engine.task import ClientResult, ClientTask
from fedlora.runtime.flower.settings import AppSettings, NodeSettings
from fedlora.runtime.flower.wire import Catchup, CodecError, decode_evaluation, \
    decode_metrics, decode_node_state, decode_result, decode_task, encode_evaluation, encode_metrics, \
    encode_node_state, encode_result, encode_task, get_catchup, get_factors, put_catchup, put_factors, wire_bytes

from support import over_the_wire


def random_factors(ranks: dict[str, tuple[int, int, int]], seed: int = 0) -> dict[str, LoraFactors]:
    """``{module: (rank, d, n)}`` → factors with awkward scales (not exactly representable decimals)."""
    generator = torch.Generator().manual_seed(seed)
    return {module: LoraFactors(torch.randn(r, n, generator=generator), torch.randn(d, r, generator=generator),
                                scale=(i + 1) / 3 + 0.1)
            for i, (module, (r, d, n)) in enumerate(ranks.items())}


def assert_factors_identical(actual: dict[str, LoraFactors] | None, expected: dict[str, LoraFactors] | None):
    assert (actual is None) == (expected is None)
    if expected is None:
        return
    assert list(actual) == list(expected)
    for module, f in expected.items():
        got = actual[module]
        assert got.A.dtype == got.B.dtype == torch.float32
        assert torch.equal(got.A, f.A.float()) and torch.equal(got.B, f.B.float()), module
        assert got.scale == f.scale, module


HETEROGENEOUS = {"model.layers.1.self_attn.v_proj": (8, 16, 24), "model.layers.0.self_attn.q_proj": (2, 24, 24),
                 "model.layers.0.mlp.down_proj": (1, 24, 40)}


def make_task(start: dict[str, LoraFactors] | None, trainable=frozenset({"A", "B"})) -> ClientTask:
    return ClientTask(client_id="client-7", server_round=3, plan=ClientPlan(rank=8, trainable=trainable, start=start),
                      alpha=16.0, init_seed=2**62 + 11, data_seed=5, local_steps=4)


def test_factors_round_trip_bit_exactly_with_mixed_ranks_and_module_order():
    factors = random_factors(HETEROGENEOUS)
    content = RecordDict()
    put_factors(content, "update", factors)
    assert_factors_identical(get_factors(over_the_wire(content), "update"), factors)
    assert get_factors(content, "absent") is None


def test_half_precision_factors_widen_losslessly_and_fp64_is_refused():
    factors = {m: LoraFactors(f.A.bfloat16(), f.B.half(), f.scale) for m, f in random_factors(HETEROGENEOUS).items()}
    content = RecordDict()
    put_factors(content, "start", factors)
    assert_factors_identical(get_factors(over_the_wire(content), "start"), factors)
    with pytest.raises(CodecError, match="q_proj.*float64"):
        put_factors(RecordDict(), "x", {"model.layers.0.self_attn.q_proj": LoraFactors(
            torch.zeros(1, 2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))})


@pytest.mark.parametrize("start", [None, random_factors(HETEROGENEOUS, seed=1)])
@pytest.mark.parametrize("trainable", [frozenset({"A", "B"}), frozenset({"B"}), frozenset()])
def test_task_round_trips(start, trainable):
    task = make_task(start, trainable)
    decoded = decode_task(over_the_wire(encode_task(task, Catchup(since=0, through=2))))
    for name in ("client_id", "server_round", "alpha", "init_seed", "data_seed", "local_steps"):
        assert getattr(decoded, name) == getattr(task, name), name
        assert type(getattr(decoded, name)) is type(getattr(task, name)), name
    for name in ("rank", "trainable", "uploads", "kept", "regularizer"):
        assert getattr(decoded.plan, name) == getattr(task.plan, name), name
        assert type(getattr(decoded.plan, name)) is type(getattr(task.plan, name)), name
    assert_factors_identical(decoded.plan.start, task.plan.start)


def test_catchup_round_trips_in_order_with_merge_flags_and_residuals():
    updates = ((2, GlobalUpdate(factors=random_factors(HETEROGENEOUS, 2), merge=True)),
               (5, GlobalUpdate(factors={}, merge=False, residual=random_factors(HETEROGENEOUS, 3))),
               (6, GlobalUpdate(factors=random_factors(HETEROGENEOUS, 4), merge=True,
                                residual=random_factors({"model.layers.0.mlp.down_proj": (3, 24, 40)}, 5))))
    catchup = Catchup(since=1, through=6, updates=updates)
    content = encode_task(make_task(None), catchup)
    decoded = get_catchup(over_the_wire(content))
    assert (decoded.since, decoded.through) == (1, 6)
    assert [r for r, _ in decoded.updates] == [2, 5, 6]
    for (_, got), (_, sent) in zip(decoded.updates, updates):
        assert got.merge == sent.merge
        assert_factors_identical(got.factors, sent.factors)
        assert_factors_identical(got.residual, sent.residual)
    expected_payload = 4 * sum(f.A.numel() + f.B.numel() for _, u in updates
                               for f in (*u.factors.values(), *u.residual.values()))
    assert wire_bytes(content) > expected_payload  # plus array headers and key names


def test_an_empty_catchup_round_trips_on_its_own():
    content = RecordDict()
    put_catchup(content, Catchup(since=4, through=4))
    assert get_catchup(over_the_wire(content)) == Catchup(since=4, through=4)


@pytest.mark.parametrize("rounds", [(3, 2), (2, 2), (1, 3), (3, 9)])
def test_catchup_rejects_rounds_out_of_order_or_outside_its_window(rounds):
    update = GlobalUpdate(factors={}, merge=True)
    with pytest.raises(CodecError, match="strictly increasing"):
        Catchup(since=1, through=5, updates=tuple((r, update) for r in rounds))


def test_result_round_trips_with_metrics_and_replica_round():
    result = ClientResult(update=ClientUpdate(factors=random_factors(HETEROGENEOUS, 6), num_examples=123,
                                              client_id="client-7"),
                          train_loss=1.2345678901234567, steps=4, seconds=0.1 + 0.2)
    decoded, replica_round = decode_result(over_the_wire(encode_result(result, replica_round=5)))
    assert replica_round == 5
    assert decoded.update.client_id == "client-7" and decoded.update.num_examples == 123
    assert (decoded.train_loss, decoded.steps, decoded.seconds) == (result.train_loss, 4, result.seconds)
    assert_factors_identical(decoded.update.factors, result.update.factors)


def test_a_withheld_train_loss_round_trips_as_none_and_a_nan_one_is_refused():
    result = ClientResult(ClientUpdate(random_factors(HETEROGENEOUS), 3, "c"), None, 1, 0.0)
    content = encode_result(result, replica_round=0)
    assert "train-loss" not in content.metric_records["metrics"]
    assert decode_result(over_the_wire(content))[0].train_loss is None
    content.metric_records["metrics"]["train-loss"] = float("nan")
    with pytest.raises(CodecError, match="train-loss must be a finite number"):
        decode_result(content)


def test_node_state_round_trips():
    assert decode_node_state(over_the_wire(encode_node_state(2, 7))) == (2, 7)


def test_missing_records_raise_codec_errors_naming_them():
    with pytest.raises(CodecError, match="'task'"):
        decode_task(RecordDict())
    with pytest.raises(CodecError, match="'metrics'"):
        decode_result(RecordDict())
    content = encode_result(ClientResult(ClientUpdate(random_factors(HETEROGENEOUS), 1, "c"), 0.0, 1, 0.0),
                            replica_round=0)
    del content["update.scale"]
    with pytest.raises(CodecError, match="update.scale"):
        decode_result(content)


def test_settings_round_trip_through_run_and_node_config():
    settings = AppSettings(run_dir="/runs/a b", federation_factory="pkg.mod:build",
                           client_factory="pkg.mod:client", round_timeout=12.5, connect_timeout=30.0)
    assert AppSettings.from_run_config(settings.to_run_config()) == settings
    node = NodeSettings(partition_id=3, data='/data/with "quotes" and spaces', state_dir="/state/3",
                        model_cache="/cache/models")
    assert NodeSettings.from_node_config(parse_config_args([node.to_node_config()])) == node
    with pytest.raises(CodecError, match="partition-id"):
        NodeSettings.from_node_config({"data": "x"})


# -- messages that carry only some factors -----------------------------------------------------

def without(factors: dict[str, LoraFactors], name: str) -> dict[str, LoraFactors]:
    """``factors`` with factor ``name`` zeroed: what a receiver gets when it stays behind."""
    return {m: LoraFactors(**{"A": f.A, "B": f.B, name: torch.zeros_like(getattr(f, name))}, scale=f.scale)
            for m, f in factors.items()}


@pytest.mark.parametrize("left_behind", ["A", "B"])
def test_a_factor_left_behind_does_not_travel_and_comes_back_as_zeros_of_its_shape(left_behind):
    factors = random_factors(HETEROGENEOUS, seed=3)
    partial, full = RecordDict(), RecordDict()
    put_factors(partial, "f", factors, frozenset("AB") - {left_behind})
    put_factors(full, "f", factors)
    assert not any(key.endswith(f".{left_behind}") for key in partial.array_records["f"])
    left_bytes = 4 * sum(getattr(f, left_behind).numel() for f in factors.values())
    assert wire_bytes(partial) <= wire_bytes(full) - left_bytes
    assert_factors_identical(get_factors(over_the_wire(partial), "f"), without(factors, left_behind))


def test_a_train_message_leaves_the_kept_factors_behind_and_its_reply_sends_only_the_uploads():
    start = random_factors({m: (8, d, n) for m, (r, d, n) in HETEROGENEOUS.items()}, seed=4)
    task = ClientTask(client_id="client-7", server_round=3, alpha=16.0, init_seed=1, data_seed=5, local_steps=4,
                      plan=ClientPlan(rank=8, start=start, uploads=frozenset("A"), kept=frozenset("B")))
    content = encode_task(task, Catchup(since=2, through=2))
    assert not any(key.endswith(".B") for key in content.array_records["start"])
    decoded = decode_task(over_the_wire(content))
    assert (decoded.plan.uploads, decoded.plan.kept) == ({"A"}, {"B"})
    assert_factors_identical(decoded.plan.start, without(start, "B"))

    trained = random_factors({m: (8, d, n) for m, (r, d, n) in HETEROGENEOUS.items()}, seed=5)
    result = ClientResult(ClientUpdate(trained, 9, "client-7"), 0.5, 4, 1.0)
    reply = encode_result(result, replica_round=2, uploads=task.plan.uploads)
    assert not any(key.endswith(".B") for key in reply.array_records["update"])
    assert_factors_identical(decode_result(over_the_wire(reply))[0].update.factors, without(trained, "B"))


def test_an_evaluation_request_and_its_metrics_round_trip():
    adapter = random_factors(HETEROGENEOUS, seed=6)
    update = GlobalUpdate(factors=random_factors(HETEROGENEOUS, seed=7), merge=True)
    content = encode_evaluation("client-2", 4, adapter, frozenset("B"), Catchup(since=2, through=4,
                                                                                updates=((3, update),)))
    client_id, server_round, received, catchup = decode_evaluation(over_the_wire(content))
    assert (client_id, server_round) == ("client-2", 4)
    assert_factors_identical(received, without(adapter, "B"))
    assert [r for r, _ in catchup.updates] == [3] and (catchup.since, catchup.through) == (2, 4)
    metrics = {"eval_loss": 0.1 + 0.2, "perplexity": float("inf"), "eval_tokens": 7,
               "mmlu_per_subject": {"anatomy": {"acc": 1 / 3, "n": 3}}}
    assert decode_metrics(over_the_wire(encode_metrics(metrics))) == metrics
    with pytest.raises(CodecError, match="'evaluation'"):
        decode_evaluation(RecordDict())
