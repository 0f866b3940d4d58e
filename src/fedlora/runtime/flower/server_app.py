"""The ServerApp: builds the run's Federation and drives it with :class:`FlowerRounds`.

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

from fedlora.engine.federation import Federation
from fedlora.files import atomic_write_text
from fedlora.imports import resolve
from fedlora.runtime.flower.clients import FlowerClients, ReceivedUpdates
from fedlora.runtime.flower.server import FlowerRounds
from fedlora.runtime.flower.settings import AppSettings

RUN_STATUS_FILE = "flower-run.json"

app = ServerApp()


def serve(grid: Grid, settings: AppSettings) -> tuple[Federation, dict]:
    """The run's Federation, built with what Flower adds (its clients' nodes and models, the
    replays it refuses across a resume, the base log its replicas catch up from), run to its
    last round over ``grid``; (the federation, what the transport saw)."""
    clients = FlowerClients(grid, settings.run_dir, round_timeout=settings.round_timeout,
                            connect_timeout=settings.connect_timeout)
    received = ReceivedUpdates()
    federation = resolve(settings.federation_factory)(Path(settings.run_dir), client_models=clients,
                                                       runtime_state={"runtime": received},
                                                       on_merge=clients.base_log.write)
    return federation, FlowerRounds(federation, clients, received).run()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = AppSettings.from_run_config(context.run_config)
    status_path = Path(settings.run_dir) / RUN_STATUS_FILE
    try:
        federation, transport = serve(grid, settings)
        status = {"status": "completed", "summary": federation.summary(), "flower": transport}
    except BaseException as error:
        atomic_write_text(status_path, json.dumps(
            {"status": "failed", "error": f"{type(error).__name__}: {error}"}))
        raise
    # default=str: summaries may hold paths or numpy scalars; the file is for reading
    atomic_write_text(status_path, json.dumps(status, default=str))
