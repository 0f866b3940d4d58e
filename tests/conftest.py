"""Shared fixtures: small client data sets written to disk, and SmolLM2 dequantised once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from support import write_clients

# Tiny models gain nothing from a second thread, and two OpenMP threads stall badly whenever
# another process holds a core; subprocesses the tests start (CLI runs, Flower apps) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def client_dir(tmp_path: Path) -> Path:
    """Three clients of unequal size (8, 12, 20 records) plus a test file, Dolly format."""
    return write_clients(tmp_path / "clients")


@pytest.fixture(scope="session", autouse=True)
def user_model_cache(tmp_path_factory) -> Path:
    """The tests' own user cache (FEDLORA_CACHE, inherited by the processes they start): the
    user's is never written, and SmolLM2 is dequantised once for the whole session, which
    xdist's workers share (their base folders are siblings)."""
    from fedlora.models import CACHE_ENV

    root = tmp_path_factory.getbasetemp()
    cache = (root.parent if "PYTEST_XDIST_WORKER" in os.environ else root) / "user-model-cache"
    cache.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        yield cache


@pytest.fixture(scope="session")
def smollm2_cache(user_model_cache) -> Path:
    """The user cache, holding the embedded SmolLM2 dequantised: tests load it in 0.2 s, not 15 s."""
    from filelock import FileLock

    from fedlora.models import load_model

    with FileLock(user_model_cache.parent / "smollm2.lock"):  # one worker dequantises, the others wait for it
        load_model("smollm2-135m", device="cpu")
    return user_model_cache


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA GPU"))])
def device(request) -> str:
    """Every device a test runs on: the CPU always, a CUDA GPU where there is one."""
    return request.param


@pytest.fixture
def server_identity():
    """Messages need the identity of the task creating them; the ServerApp process has one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


#: the modules that take longest on a worker (measured with --durations, 2 cores), started first so
#: that no long one is left alone at the end; `make test` keeps each module on one worker
LONGEST_MODULES = ("test_privacy.py", "test_flower_engine.py", "test_crash.py", "test_quantized.py",
                   "test_flower_secure.py", "test_flower_node_loss.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: place for place, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
