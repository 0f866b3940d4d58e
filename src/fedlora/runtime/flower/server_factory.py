"""What the ServerApp builds from a run folder: the run's Federation, as the in-process runtime does.

The ServerApp reads the run's saved ``config.json``; the Federation it builds is the
in-process one, given what the Flower runtime adds (its clients' models, its state, the log of
base merges its replicas catch up from).
"""

from __future__ import annotations

from pathlib import Path

from fedlora.engine.config import CONFIG_FILE, load_saved_config
from fedlora.engine.federation import Federation
from fedlora.engine.inputs import load_run_model
from fedlora.engine.setup import prepare_run
from fedlora.runtime.flower.settings import run_model_cache


def federation_factory(run_dir: Path, **runtime) -> Federation:
    """The server's Federation, with the Flower runtime's parts (see
    :func:`fedlora.engine.setup.prepare_run`).

    With a model cache in the run folder (a local deployment's) the model is loaded through
    it: a GGUF model is dequantised once, here, before the SuperNodes (which get no message
    before the Federation exists) load the same weights from the cache.
    """
    config = load_saved_config(Path(run_dir) / CONFIG_FILE)
    cache = run_model_cache(run_dir)
    loaded = load_run_model(config, gguf_cache=cache) if cache.is_dir() else None
    return prepare_run(config, Path(run_dir), loaded=loaded, **runtime).federation
