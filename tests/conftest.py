"""Shared fixtures: small client data sets written to disk, and the real shared data folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from a second thread, and two OpenMP threads stall badly whenever
# another process holds a core; subprocesses the tests start (CLI runs, Flower apps) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DOLLY = SHARED_DATA / "dolly-10clients"
MMLU = SHARED_DATA / "mmlu" / "mmlu_test_1444.json"

CATEGORIES = ("open_qa", "summarization", "brainstorming", "alpaca")


def make_records(client: int, count: int) -> list[dict]:
    return [{"instruction": f"Question {i} from client {client}: name a colour.",
             "context": "" if i % 3 else f"Context {i}",
             "response": f"Answer {i}: {'red green blue'.split()[(i + client) % 3]}.",
             "category": CATEGORIES[(i + client) % len(CATEGORIES)]} for i in range(count)]


@pytest.fixture
def client_dir(tmp_path: Path) -> Path:
    """Three clients of unequal size (8, 12, 20 records) plus a test file, Dolly format."""
    folder = tmp_path / "clients"
    folder.mkdir()
    for client, count in ((0, 8), (1, 12), (2, 20)):
        (folder / f"local_training_{client}.json").write_text(json.dumps(make_records(client, count)))
    (folder / "global_test.json").write_text(json.dumps(make_records(9, 6)))
    return folder


def require_shared_data() -> None:
    if not DOLLY.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """A model cache holding the embedded SmolLM2 dequantised: tests load it in 0.3 s, not 22 s."""
    from fedlora.models import load_model

    cache = tmp_path_factory.mktemp("model-cache")
    load_model("smollm2-135m", device="cpu", gguf_cache=cache)
    return cache
