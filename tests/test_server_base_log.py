"""The server's log of base merges (the Flower runtime's, for its replicas) lives on disk, one file per round."""

from __future__ import annotations

import shutil

import torch

from fedlora.engine.checkpoint import load_latest_checkpoint
from fedlora.engine.client import LocalTrainer
from fedlora.engine.config import save_config
from fedlora.runtime.flower.clients import BASE_LOG_DIR, FlowerClients
from fedlora.engine.setup import prepare_run
from fedlora.eval.loss import pad_token_id
from fedlora.lora.merge import base_weight
from fedlora.models import load_model
from fedlora.runtime.inprocess import run_inprocess

from support import tiny_config

SETTINGS = {"rounds": 3, "fraction": 2 / 3, "ranks": [4, 2, 1], "local_steps": 1, "dtype": "bfloat16"}


def logged(clients: FlowerClients, since: int = 0) -> list:
    """The logged base merges after round ``since``, oldest first."""
    return [(r, clients.base_log.load(r)) for r in clients.base_log.rounds() if r > since]


def logged_run(client_dir, run_dir, **overrides):
    config = tiny_config(client_dir, run_dir, **{**SETTINGS, **overrides})
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.json")
    clients = FlowerClients(None, run_dir, round_timeout=1.0, connect_timeout=0.0)
    setup = prepare_run(config, run_dir, log=lambda message: None, on_merge=clients.base_log.write)
    run_inprocess(setup)
    return setup.federation, clients


def test_the_logged_rounds_rebuild_the_server_model_and_stay_out_of_memory_and_checkpoints(client_dir, tmp_path):
    federation, clients = logged_run(client_dir, tmp_path / "run")
    assert sorted(int(p.stem.removeprefix("round-")) for p in (tmp_path / "run" / BASE_LOG_DIR).iterdir()) \
        == [1, 2, 3]
    state, tensors = load_latest_checkpoint(tmp_path / "run")
    assert not [key for key in tensors if key.startswith("log/")] and "base_log" not in state

    # a pristine replica (bfloat16: merges leave a carry) replaying the log equals the server's model
    model, tokenizer = load_model("tiny-llama", dtype="bfloat16", device=str(federation.global_model.device))
    replica = LocalTrainer(model, pad_token_id(tokenizer), target_modules=["q_proj", "v_proj"], batch_size=2)
    for _, update in logged(clients):
        replica.apply_base_update(update)
    server = federation.global_model.adapted_weights()
    assert server and all(torch.equal(base_weight(replica.model, name), weight) for name, weight in server.items())
    assert [r for r, _ in logged(clients, 2)] == [3]


def test_a_round_logged_after_the_last_checkpoint_is_dropped_on_resume(client_dir, tmp_path):
    run_dir = tmp_path / "run"
    logged_run(client_dir, run_dir, rounds=2)
    log = run_dir / BASE_LOG_DIR
    # as if killed after logging round 3's merge but before its checkpoint
    shutil.copy(log / "round-000002.safetensors", log / "round-000003.safetensors")
    config = tiny_config(client_dir, run_dir, **SETTINGS)  # --resume --rounds 3
    clients = FlowerClients(None, run_dir, round_timeout=1.0, connect_timeout=0.0)
    setup = prepare_run(config, run_dir, log=lambda message: None, on_merge=clients.base_log.write)
    completed = setup.federation.start()
    clients.forget_after(completed)  # as the Flower runtime does on resume
    assert completed == 2
    assert sorted(p.name for p in log.iterdir()) == ["round-000001.safetensors", "round-000002.safetensors"]
    run_inprocess(setup)
    _, reference = logged_run(client_dir, tmp_path / "uninterrupted")
    for (r, update), (r_ref, expected) in zip(logged(clients), logged(reference), strict=True):
        assert r == r_ref
        for module, factors in expected.factors.items():
            assert torch.equal(update.factors[module].B, factors.B), (r, module)
