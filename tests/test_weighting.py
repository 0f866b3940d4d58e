"""The run's ``weighting``: examples (dataset sizes), uniform, processed (examples trained on this round).

On clients of different sizes the conventions give different averages; each is checked against
a float64 dense computation of Σ p_k ΔW_k with its own p_k, built here from the raw tensors, for
an exact method (FLoRA's stack) and an averaging one (FedIT's factors), then on the engine
(tiny-llama, in-process and over Flower), where the client reports what it processed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedlora.aggregation import AggregationError, ClientUpdate, LoraFactors, get_aggregator
from fedlora.aggregation.factors import client_weights
from fedlora.engine.config import ConfigError
from fedlora.engine.gate import admit
from fedlora.engine.setup import prepare_run
from fedlora.runtime.flower.wire import decode_result, encode_result

from support import over_the_wire, run_on_in_memory_flower, run_tiny, tiny_config, without_times

SHAPES = {"q": (12, 10), "v": (8, 10)}
#: dataset sizes and the examples each processed this round (3 steps of 4, one with a short last batch)
EXAMPLES = {"c0": 5, "c1": 40, "c2": 9}
PROCESSED = {"c0": 12, "c1": 12, "c2": 9}


def updates(seed: int = 0) -> list[ClientUpdate]:
    generator = torch.Generator().manual_seed(seed)
    return [ClientUpdate({module: LoraFactors(torch.randn(3, n, generator=generator),
                                              torch.randn(d, 3, generator=generator), 2.0)
                          for module, (d, n) in SHAPES.items()}, EXAMPLES[cid], cid, PROCESSED[cid])
            for cid in EXAMPLES]


def dense(factors: LoraFactors) -> torch.Tensor:
    return factors.scale * factors.B.double() @ factors.A.double()


def shares(counts: dict[str, int]) -> list[float]:
    return [count / sum(counts.values()) for count in counts.values()]


EXPECTED = {"examples": shares(EXAMPLES), "uniform": [1 / 3] * 3, "processed": shares(PROCESSED)}


@pytest.mark.parametrize("weighting", list(EXPECTED))
def test_flora_and_fedit_use_the_weighting_s_shares_against_float64(weighting):
    clients = updates()
    weights = client_weights(clients, weighting)
    assert weights is None if weighting == "examples" else weights == pytest.approx(EXPECTED[weighting], abs=0)
    p = EXPECTED[weighting]
    stacked = get_aggregator("flora").aggregate(clients, weights)
    averaged = get_aggregator("fedit").aggregate(clients, weights)
    for module in SHAPES:
        exact = sum(w * dense(u.factors[module]) for w, u in zip(p, clients))
        torch.testing.assert_close(stacked.delta(module, torch.float64), exact, rtol=1e-6, atol=1e-6)
        mean_A = sum(w * u.factors[module].A.double() for w, u in zip(p, clients))
        mean_B = sum(w * u.factors[module].B.double() for w, u in zip(p, clients))
        torch.testing.assert_close(averaged.delta(module, torch.float64), 2.0 * mean_B @ mean_A, rtol=1e-6, atol=1e-6)


def test_on_clients_of_different_sizes_uniform_and_examples_give_different_averages():
    """c1 holds 40 of the 54 examples: 0.74 of the examples average, 1/3 of the uniform one."""
    clients = updates(1)
    by_examples = get_aggregator("flora").aggregate(clients, client_weights(clients, "examples"))
    uniform = get_aggregator("flora").aggregate(clients, client_weights(clients, "uniform"))
    for module in SHAPES:
        difference = by_examples.delta(module, torch.float64) - uniform.delta(module, torch.float64)
        expected = sum((e - 1 / 3) * dense(u.factors[module]) for e, u in zip(shares(EXAMPLES), clients))
        torch.testing.assert_close(difference, expected, rtol=1e-6, atol=1e-6)
        assert difference.norm() > 0.3 * by_examples.delta(module, torch.float64).norm()


def test_processed_weighting_needs_every_client_to_report_it():
    clients = updates()
    clients[1] = dataclasses.replace(clients[1], num_processed=None)
    with pytest.raises(AggregationError) as error:
        client_weights(clients, "processed")
    assert (error.value.rule, error.value.client_id) == ("num_processed", "c1")


def test_the_processed_count_travels_over_flower_and_the_gate_bounds_it(client_dir, tmp_path):
    from fedlora.engine.task import ClientResult
    result = ClientResult(updates()[0], 0.5, 3, 0.1)
    decoded, _ = decode_result(over_the_wire(encode_result(result, replica_round=0)))
    assert decoded.update.num_processed == 12
    absent, _ = decode_result(over_the_wire(encode_result(
        dataclasses.replace(result, update=dataclasses.replace(result.update, num_processed=None)), replica_round=0)))
    assert absent.update.num_processed is None
    # a client claiming more than its steps' full batches could hold is rejected
    config = tiny_config(client_dir, tmp_path / "run", ranks=[2], rounds=1, local_steps=2, batch_size=2)
    setup = prepare_run(config, tmp_path / "run", log=lambda message: None)
    setup.federation.start()
    task = setup.federation.configure_train(1)[0]
    trained = setup.trainer.train(task, setup.client_examples[task.client_id])
    assert trained.update.num_processed == 4  # 2 steps of 2
    admit(trained.update, task, setup.federation.shapes, config)
    with pytest.raises(AggregationError) as error:
        admit(dataclasses.replace(trained.update, num_processed=5), task, setup.federation.shapes, config)
    assert error.value.rule == "num_processed" and "exceeds the 4 examples" in str(error.value)


def test_client_level_dp_keeps_its_own_weights(client_dir, tmp_path):
    with pytest.raises(ConfigError, match="'weighting' is 'uniform' but client-level DP"):
        tiny_config(client_dir, tmp_path, method="ffa", ranks=[2], weighting="uniform",
                    client_dp={"noise_multiplier": 1.0, "clip_norm": 1.0})
    with pytest.raises(ConfigError, match="'weighting' must be one of"):
        tiny_config(client_dir, tmp_path, weighting="by-size")


def float64_model(federation) -> dict[str, torch.Tensor]:
    return {name: weight.double() for name, weight in federation.global_model.adapted_weights().items()}


@pytest.mark.parametrize("weighting", ["examples", "uniform", "processed"])
def test_a_flora_round_on_tiny_llama_moves_the_model_by_the_weighting_s_average(client_dir, tmp_path, weighting):
    """Clients of 8, 12 and 20 records (7, 11, 19 after the validation hold-out) train half an
    epoch of batches of 2: 2, 3 and 5 steps, processing 4, 6 and 10 examples."""
    config = tiny_config(client_dir, tmp_path / "run", method="flora", ranks=[2], rounds=1, local_steps=None,
                         local_epochs=0.5, weighting=weighting)
    setup = prepare_run(config, tmp_path / "run", log=lambda message: None)
    federation = setup.federation
    federation.start()
    before = float64_model(federation)
    tasks = federation.configure_train(1)
    results = [setup.trainer.train(task, setup.client_examples[task.client_id]) for task in tasks]
    assert [r.update.num_processed for r in results] == [4, 6, 10]
    assert [r.update.num_examples for r in results] == [7, 11, 19]
    counts = {"examples": [7, 11, 19], "uniform": [1, 1, 1], "processed": [4, 6, 10]}[weighting]
    p = [count / sum(counts) for count in counts]
    row = federation.aggregate_train(1, results).to_json()
    assert not row["rejected"] and row["aggregation_error"] < 1e-6  # measured against the same p_k
    for name, after in float64_model(federation).items():
        change = sum(w * dense(r.update.factors[name]) for w, r in zip(p, results))
        torch.testing.assert_close(after - before[name], change, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_processed_weighting_over_flower_equals_the_in_process_run(client_dir, tmp_path, server_identity):
    overrides = {"method": "fedit", "ranks": [2], "local_steps": None, "local_epochs": 0.5, "weighting": "processed",
                 "fraction": 2 / 3}
    expected = run_tiny(client_dir, tmp_path / "inprocess", **overrides)
    _, report = run_on_in_memory_flower(tiny_config(client_dir, tmp_path / "flower", runtime="flower", **overrides),
                                        tmp_path / "nodes")
    from fedlora.engine.metrics import read_metrics
    rows = read_metrics(tmp_path / "flower")
    assert without_times(rows) == without_times(expected)
    examples = run_tiny(client_dir, tmp_path / "examples", **{**overrides, "weighting": "examples"})
    assert examples[-1]["eval_loss"] != rows[-1]["eval_loss"]
