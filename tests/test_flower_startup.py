"""Flower on one machine: SuperNodes sized to the cores and spread over the GPUs, the ServerApp
loading through the run folder's model cache (so that no SuperNode dequantises a GGUF model)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from flwr.common.config import parse_config_args

from fedlora.engine.config import build_config, save_config
from fedlora.lora import base_weight
from fedlora.runtime.flower import client_factory, server_factory
from fedlora.runtime.flower.deployment import LocalDeployment
from fedlora.runtime.flower.runner import app_settings, node_gpus, threads_per_node
from fedlora.runtime.flower.settings import NodeSettings, run_model_cache


@pytest.mark.parametrize(("cores", "nodes", "per_round", "expected"),
                         [(2, 9, 3, 1), (16, 9, 3, 5), (16, 2, 3, 8), (4, 4, None, 1)])
def test_nodes_share_the_cores_among_those_that_train_at_once(monkeypatch, cores, nodes, per_round, expected):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    config = build_config({"clients_per_round": per_round})  # None: fraction 1.0, every node
    assert threads_per_node(config, nodes) == expected


def test_node_threads_and_device_travel_in_the_node_config():
    node = NodeSettings(partition_id=2, data="/data/2.json", state_dir="/state/2", model_cache="/cache", threads=3,
                        device="cuda")
    assert NodeSettings.from_node_config(parse_config_args([node.to_node_config()])) == node
    assert NodeSettings.from_node_config({"partition-id": 0}).threads == 0  # torch's default
    assert NodeSettings.from_node_config({"partition-id": 0}).device == ""  # the run's


@pytest.mark.parametrize(("gpus", "visible", "device", "expected"), [
    (2, None, None, ["0", "1"]), (2, "5,7", None, ["5", "7"]), (2, "5,7", "cuda:1", ["5", "7"]),
    (2, None, "cpu", []), (0, None, None, [])])
def test_a_local_deployment_spreads_its_supernodes_over_every_gpu_the_launcher_sees(
        monkeypatch, gpus, visible, device, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert node_gpus(build_config({"device": device})) == expected


def process_environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


@pytest.mark.slow  # starts a SuperLink and three SuperNodes
def test_supernode_i_sees_only_gpu_i_mod_n_and_trains_on_it(tmp_path):
    with LocalDeployment(tmp_path, 3, gpus=["0", "1"]) as deployment:
        environments = [process_environment(process.pid) for process in deployment.supernodes]
        commands = [Path(f"/proc/{process.pid}/cmdline").read_bytes().decode() for process in deployment.supernodes]
        superlink = process_environment(deployment.superlink.pid)
    assert [environment["CUDA_VISIBLE_DEVICES"] for environment in environments] == ["0", "1", "0"]
    assert all('device="cuda"' in command for command in commands)
    assert superlink.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")  # the server's are all


def test_a_node_loads_the_model_on_its_own_device_not_the_runs(client_dir, tmp_path):
    config = build_config({"model": "tiny-llama", "data": str(client_dir), "ranks": [2], "max_length": 32,
                           "device": "cuda:7", "out": str(tmp_path)})  # no such GPU here: only the node's device works
    trainer, _ = client_factory.client_factory(app_settings(config, tmp_path), NodeSettings(0, device="cpu"))
    assert base_weight(trainer.model, "model.layers.0.self_attn.q_proj").device.type == "cpu"


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
