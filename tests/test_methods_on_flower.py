"""FedSA-LoRA, LoRA-FAIR, FLoRIST, HetLoRA, raFLoRA, FedSVD, FLoRA-NA and FedMomentum end to end
on both runtimes, with the communication their papers describe.

Each method runs two rounds (HetLoRA three, for its pruned ranks) in-process and over Flower and
must give the same metrics (the clients' own models included), the same model and the same
method state. Flower here is the
real strategy, ClientApp and factories with every message serialised as Flower does, in this
process (support.InMemoryGrid): real SuperLink and SuperNode processes cost minutes a run
on this machine, and test_flower_engine.py runs them for FLoRA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.aggregation import get_aggregator
from fedlora.engine.checkpoint import load_latest_checkpoint, with_prefix
from fedlora.engine.personalisation import CLIENT_STATE_DIR
from fedlora.engine.config import save_config
from fedlora.runtime.flower.clients import BASE_LOG_DIR
from fedlora.engine.ledger import BYTES_PER_PARAM
from fedlora.engine.metrics import read_metrics
from fedlora.engine.setup import prepare_run
from fedlora.runtime.inprocess import run_inprocess

from support import run_on_in_memory_flower, tiny_config, without_times

pytestmark = pytest.mark.slow
RANKS = {"fedsa": [2], "lorafair": [2], "florist": [4, 2, 1], "hetlora": [4, 2, 1], "raflora": [4, 2, 1],
         "fedsvd": [2], "florana": [2], "fedmomentum": [2], "ravan": [2], "fedplora": [4, 2, 1],
         "flora-adalora": [4, 2, 1]}
#: HetLoRA runs a third round, every client sampled, so that self-pruned ranks travel too
OVERRIDES = {"hetlora": {"rounds": 3, "fraction": 1.0, "method_options": {"gamma": 0.5, "penalty": 1.0}},
             "ravan": {"method_options": {"heads": 2}},
             "flora-adalora": {"local_steps": 3}}  # steps for its budget to fall in


def config_for(client_dir: Path, out: Path, method: str, **overrides):
    return tiny_config(client_dir, out, **{"fraction": 2 / 3, "local_steps": 1, "min_clients": 1, "method": method,
                                           "ranks": RANKS[method], **OVERRIDES.get(method, {}), **overrides})


def in_process(client_dir: Path, out: Path, method: str) -> list[dict]:
    out.mkdir(parents=True)
    config = config_for(client_dir, out, method)
    save_config(config, out / "config.json")
    run_inprocess(prepare_run(config, out, log=lambda message: None))
    return read_metrics(out)


def over_flower(client_dir: Path, out: Path, nodes_dir: Path, method: str) -> tuple[list[dict], dict]:
    _, report = run_on_in_memory_flower(config_for(client_dir, out, method, runtime="flower"), nodes_dir)
    return read_metrics(out), report


def checkpoint_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_latest_checkpoint(run_dir)[1]


def factor_sizes(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Module → (d, n) of the adapted weights, from the run's checkpoint."""
    return {name: tuple(weight.shape) for name, weight in with_prefix("model/base/", checkpoint_tensors(run_dir)).items()}


def fedsa_sends_A_only_and_keeps_B_on_the_clients(run_dir: Path, nodes_dir: Path, rows: list[dict], report: dict):
    shapes = factor_sizes(run_dir)
    a_params, b_params = sum(2 * n for d, n in shapes.values()), sum(d * 2 for d, n in shapes.values())  # rank 2
    for row in rows[1:]:
        assert row["params_up"] == row["params_down"] == len(row["clients"]) * a_params
        wire = report["transfers"][str(row["round"])]["bytes_up"]
        assert wire < BYTES_PER_PARAM * (row["params_up"] + len(row["clients"]) * b_params)  # no B travelled
    # each client's B is in its node's store and nowhere on the server
    assert not (run_dir / CLIENT_STATE_DIR).exists()
    for cid in {cid for row in rows for cid in row["clients"]}:
        newest = sorted((nodes_dir / cid).glob(f"run-*/{CLIENT_STATE_DIR}/{cid}/round-*.safetensors"))[-1]
        kept = load_file(newest)
        assert {key.split("/")[0] for key in kept} == {"B"} and len(kept) == len(shapes)
    # the clients' own models differ: each was evaluated with its own B
    final = rows[-1]["per_client"]
    assert set(final) == {"0", "1", "2"} and len({metrics["eval_loss"] for metrics in final.values()}) > 1
    assert rows[-1]["eval_loss"] == pytest.approx(sum(m["eval_loss"] for m in final.values()) / 3, rel=1e-12)


def fedsvd_sends_B_only(run_dir: Path, nodes_dir: Path, rows: list[dict], report: dict):
    shapes = factor_sizes(run_dir)
    a_params, b_params = sum(2 * n for d, n in shapes.values()), sum(d * 2 for d, n in shapes.values())  # rank 2
    for row in rows[1:]:
        assert row["params_up"] == len(row["clients"]) * b_params
        assert row["params_down"] == len(row["clients"]) * (a_params + b_params)  # the server's A, and B
        wire = report["transfers"][str(row["round"])]["bytes_up"]
        assert wire < BYTES_PER_PARAM * (row["params_up"] + len(row["clients"]) * a_params)  # no A travelled


def ravan_sends_the_cores_only(run_dir: Path, nodes_dir: Path, rows: list[dict], report: dict):
    shapes = factor_sizes(run_dir)
    cores = len(shapes) * 2 * 2 * 2  # modules × 2 heads × r × r
    for row in rows[1:]:
        assert row["params_up"] == row["params_down"] == len(row["clients"]) * cores
        transfer = report["transfers"][str(row["round"])]
        heads = len(row["clients"]) * sum(4 * (d + n) for d, n in shapes.values())  # A and B at rank h·r = 4
        assert transfer["bytes_up"] < BYTES_PER_PARAM * (row["params_up"] + heads)  # the frozen heads stayed
        assert transfer["bytes_down"] < BYTES_PER_PARAM * (row["params_down"] + heads)  # both ways


def fedplora_downloads_every_module(run_dir: Path, nodes_dir: Path, rows: list[dict], report: dict):
    per_rank = sum(d + n for d, n in factor_sizes(run_dir).values())
    for row in rows[1:]:  # the modules it trains and those it folds into its weights travel
        assert row["params_down"] == len(row["clients"]) * 4 * per_rank
        assert BYTES_PER_PARAM * row["params_down"] < report["transfers"][str(row["round"])]["bytes_down"]


def flora_adalora_sends_its_pruned_ranks(run_dir: Path, nodes_dir: Path, rows: list[dict], report: dict):
    for row in rows[1:]:
        assert row["ranks_sent"] < row["flora_ranks"]


def florist_downloads_one_global_pair(run_dir: Path, nodes_dir: Path, rows: list[dict], report: dict):
    pair = load_file(run_dir / BASE_LOG_DIR / "round-000001.safetensors")
    pair_params = sum(tensor.numel() for key, tensor in pair.items() if not key.endswith(".scale"))
    stacked_rank = sum(rank for cid, rank in zip("012", RANKS["florist"]) if cid in rows[1]["clients"])
    assert pair_params < stacked_rank * sum(d + n for d, n in factor_sizes(run_dir).values())  # < FLoRA's stack
    # round 1: nothing to download (fresh LoRAs); round 2: every client catches up on the one pair
    assert rows[1]["params_down"] == 0
    assert rows[2]["params_down"] == len(rows[2]["clients"]) * pair_params
    assert report["transfers"]["2"]["catchup_bytes"] == BYTES_PER_PARAM * rows[2]["params_down"]


def hetlora_clients_send_their_self_pruned_ranks(run_dir: Path, nodes_dir: Path, rows: list[dict], report: dict):
    assert rows[1]["params_up"] == rows[2]["params_up"] > rows[3]["params_up"]  # a rank shrank after round 2


LEDGER_CHECKS = {"fedsa": fedsa_sends_A_only_and_keeps_B_on_the_clients, "florist": florist_downloads_one_global_pair,
                 "hetlora": hetlora_clients_send_their_self_pruned_ranks, "fedsvd": fedsvd_sends_B_only,
                 "ravan": ravan_sends_the_cores_only, "fedplora": fedplora_downloads_every_module,
                 "flora-adalora": flora_adalora_sends_its_pruned_ranks}


@pytest.mark.parametrize("method", list(RANKS))
def test_a_run_over_flower_equals_the_in_process_run(client_dir, tmp_path, method, server_identity):
    expected = in_process(client_dir, tmp_path / "inprocess", method)
    rows, report = over_flower(client_dir, tmp_path / "flower", tmp_path / "nodes", method)
    assert without_times(rows) == without_times(expected)
    rounds = list(range(OVERRIDES.get(method, {}).get("rounds", 2) + 1))
    assert [row["round"] for row in rows] == rounds
    assert not any(row["rejected"] or row["failures"] for row in rows)
    # the model and the method's state (FedSA-LoRA's Ā, HetLoRA's ranks, …) as well
    server, reference = checkpoint_tensors(tmp_path / "flower"), checkpoint_tensors(tmp_path / "inprocess")
    assert server.keys() == reference.keys()
    assert all(torch.equal(server[key], reference[key]) for key in reference), method
    assert load_latest_checkpoint(tmp_path / "flower")[0]["method"] == load_latest_checkpoint(
        tmp_path / "inprocess")[0]["method"]
    # the bytes Flower carried up are the ledger's uploads plus array headers (under 256 bytes each), no more
    modules = len(factor_sizes(tmp_path / "flower"))
    for server_round in rounds[1:]:
        wire, counted = report["transfers"][str(server_round)]["bytes_up"], rows[server_round]["bytes_up"]
        arrays = len(rows[server_round]["clients"]) * modules * len(get_aggregator(method).uploads(server_round))
        assert counted < wire < counted + 256 * arrays, server_round
    if method in LEDGER_CHECKS:
        LEDGER_CHECKS[method](tmp_path / "flower", tmp_path / "nodes", rows, report)
