"""Crash-safe checkpoints: safetensors + JSON, written to a temporary folder then renamed.

A run folder holds ``checkpoints/round-NNNN/`` folders, each complete or absent, and
``checkpoints/LATEST`` naming the newest. A kill at any moment leaves the previous complete
checkpoint loadable; a half-written folder is never named by LATEST and is swept on the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedlora.files import atomic_write_text, fsync_path

STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"


def with_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors stored under ``prefix``, keyed without it."""
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as safetensors accepts them: it refuses two that share storage (views of
    one stacked factor, say), so only those are copied; the base weights are written in place."""
    owners = Counter(tensor.untyped_storage().data_ptr() for tensor in tensors.values())
    return {key: (tensor.detach().clone() if owners[tensor.untyped_storage().data_ptr()] > 1
                  else tensor.detach()).contiguous()
            for key, tensor in tensors.items()}


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically and durably: once this returns it survives a crash,
    and a reader sees the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(unshared(tensors), tmp, metadata=metadata)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def save_checkpoint(run_dir: Path, server_round: int, state: dict, tensors: dict[str, torch.Tensor]) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{server_round:04d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(unshared(tensors), tmp / TENSORS_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    for file in tmp.iterdir():
        fsync_path(file)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(root)
    atomic_write_text(root / "LATEST", name)
    for old in root.iterdir():  # earlier rounds and leftovers of interrupted saves
        if old.name not in (name, "LATEST") and not old.name.startswith(".LATEST"):
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest_checkpoint(run_dir: Path,
                           device: torch.device | str = "cpu") -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The newest complete checkpoint, its tensors on ``device``, or None if the run has none yet."""
    root = Path(run_dir) / "checkpoints"
    try:
        name = (root / "LATEST").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    folder = root / name
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    return state, load_file(folder / TENSORS_FILE, device=str(device))
