"""What the ServerApp builds from a run folder: the run's Federation, as the in-process runtime does.

The ServerApp reads the run's saved ``config.json``; the Federation it builds is the
in-process one, keeping the log of base merges that replicas catch up from.
"""

from __future__ import annotations

from pathlib import Path

from fedlora.engine.config import CONFIG_FILE, load_saved_config
from fedlora.engine.federation import Federation
from fedlora.engine.setup import prepare_run


def federation_factory(run_dir: Path) -> Federation:
    """The server's Federation; it keeps the log of base merges that replicas catch up from."""
    return prepare_run(load_saved_config(Path(run_dir) / CONFIG_FILE), Path(run_dir),
                       keep_base_log=True).federation
