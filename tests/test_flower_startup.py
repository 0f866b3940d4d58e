"""Flower on one machine: SuperNodes sized to the cores, the ServerApp loading through the run
folder's model cache (so that no SuperNode dequantises a GGUF model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedlora.engine.config import build_config, save_config
from fedlora.runtime.flower import server_factory
from fedlora.runtime.flower.settings import NodeSettings, run_model_cache
from fedlora.runtime.flower.runner import threads_per_node


@pytest.mark.parametrize(("cores", "nodes", "per_round", "expected"),
                         [(2, 9, 3, 1), (16, 9, 3, 5), (16, 2, 3, 8), (4, 4, None, 1)])
def test_nodes_share_the_cores_among_those_that_train_at_once(monkeypatch, cores, nodes, per_round, expected):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    config = build_config({"clients_per_round": per_round})  # None: fraction 1.0, every node
    assert threads_per_node(config, nodes) == expected


def test_node_threads_travel_in_the_node_config():
    node = NodeSettings(partition_id=2, data="/data/2.json", state_dir="/state/2", model_cache="/cache", threads=3)
    assert NodeSettings.from_node_config(parse_config_args([node.to_node_config()])) == node
    assert NodeSettings.from_node_config({"partition-id": 0}).threads == 0  # torch's default


@pytest.mark.parametrize("with_cache", [True, False])
def test_the_server_loads_its_model_through_the_run_folders_cache(client_dir, tmp_path, monkeypatch, with_cache):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(build_config({"model": "tiny-llama", "data": str(client_dir), "ranks": [2], "max_length": 32}),
                run_dir / "config.json")
    if with_cache:
        run_model_cache(run_dir).mkdir()
    caches: list[Path] = []
    load = server_factory.load_run_model
    monkeypatch.setattr(server_factory, "load_run_model",
                        lambda config, gguf_cache: caches.append(gguf_cache) or load(config, gguf_cache=gguf_cache))
    federation = server_factory.federation_factory(run_dir)
    assert caches == ([run_model_cache(run_dir)] if with_cache else [])
    assert list(federation.schedule.client_ids) == ["0", "1", "2"]
