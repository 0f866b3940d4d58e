"""The ServerApp: builds the run's Federation and drives it with :class:`FedLoraStrategy`.

The Federation writes the usual run outputs (metrics, checkpoints) into the run folder
itself. When the run ends, successfully or not, the ServerApp writes
``<run dir>/flower-run.json`` – the signal the launching process waits for, carrying the
Federation's summary and what the transport saw (traffic, failures, replica rounds).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.files import atomic_write_text
from fedlora.runtime.flower.codec import AppSettings, resolve_factory
from fedlora.runtime.flower.strategy import FedLoraStrategy

RUN_STATUS_FILE = "flower-run.json"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = AppSettings.from_run_config(context.run_config)
    status_path = Path(settings.run_dir) / RUN_STATUS_FILE
    try:
        federation = resolve_factory(settings.federation_factory)(Path(settings.run_dir))
        strategy = FedLoraStrategy(federation, round_timeout=settings.round_timeout,
                                   connect_timeout=settings.connect_timeout)
        transport = strategy.run(grid)
        status = {"status": "completed", "summary": federation.summary(), "flower": transport}
    except BaseException as error:
        atomic_write_text(status_path, json.dumps(
            {"status": "failed", "error": f"{type(error).__name__}: {error}"}))
        raise
    # default=str: summaries may hold paths or numpy scalars; the file is for reading
    atomic_write_text(status_path, json.dumps(status, default=str))
