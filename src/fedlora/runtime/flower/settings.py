"""What configures the Flower apps: the app's run config (:class:`AppSettings`) and each
SuperNode's node config (:class:`NodeSettings`), and where a run keeps its model cache."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.runtime.flower.wire import CodecError, _reader


@dataclass(frozen=True)
class AppSettings:
    """The Flower app's run config (``[tool.flwr.app.config]``), shared by both apps.

    ``federation_factory(run_dir, **runtime)`` builds the server's Federation (the run folder is
    on the server's machine; ``runtime``: what the Flower runtime gives it, see
    :func:`fedlora.engine.setup.prepare_run`); ``client_factory(settings, node)`` (node: :class:`NodeSettings`) builds
    ``(trainer, examples)`` on a node, which may be another machine, and
    ``evaluation_factory(settings, node)`` ``(trainer, evaluate(model, round))`` on a node asked
    to evaluate its client's own model: what they need to know of the run travels in
    ``run_config`` (the run's configuration as JSON).
    """

    run_dir: str
    federation_factory: str
    client_factory: str
    evaluation_factory: str = "fedlora.runtime.flower.client_factory:evaluation_factory"
    #: seconds a round (or the final sync) waits for replies before counting failures
    round_timeout: float = 600.0
    #: seconds the first round waits for every partition's SuperNode to identify itself
    connect_timeout: float = 120.0
    run_config: str = "{}"

    def to_run_config(self) -> dict[str, str | float]:
        return {"run-dir": self.run_dir, "federation-factory": self.federation_factory,
                "client-factory": self.client_factory, "evaluation-factory": self.evaluation_factory,
                "round-timeout": self.round_timeout,
                "connect-timeout": self.connect_timeout, "fedlora-config": self.run_config}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppSettings:
        value = _reader(run_config, "run config")
        return cls(run_dir=str(value("run-dir")),
                   federation_factory=str(value("federation-factory")),
                   client_factory=str(value("client-factory")),
                   evaluation_factory=str(value("evaluation-factory")),
                   round_timeout=float(value("round-timeout")),
                   connect_timeout=float(value("connect-timeout")),
                   run_config=str(value("fedlora-config")))


def run_model_cache(run_dir: Path | str) -> Path:
    """A run folder's model cache: the SuperNodes of a local deployment share it, and a
    ServerApp whose run folder has one loads its model through it."""
    return Path(run_dir) / "model-cache"


@dataclass(frozen=True)
class NodeSettings:
    """A SuperNode's ``--node-config``: its partition, where its data is, where it keeps state."""

    partition_id: int
    data: str = ""
    #: the replica's base-update log lives in ``state_dir/run-<run id>``
    state_dir: str = ""
    #: where a GGUF model is kept dequantised between messages; empty: dequantise for every one
    model_cache: str = ""
    #: torch intra-op threads of the node's ClientApp (so that nodes sharing a machine do not
    #: oversubscribe its cores); 0: torch's default, every core
    threads: int = 0
    #: the torch device the node trains on; empty: the run's ``device``
    device: str = ""

    def to_node_config(self) -> str:
        """The ``--node-config`` argument: space-separated ``key=<TOML value>`` pairs."""
        return (f"partition-id={self.partition_id} data={_quoted(self.data, 'data')} "
                f"state-dir={_quoted(self.state_dir, 'state-dir')} "
                f"model-cache={_quoted(self.model_cache, 'model-cache')} threads={self.threads} "
                f"device={_quoted(self.device, 'device')}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        partition_id = int(_reader(node_config, "node config")("partition-id"))
        flwr_home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
        state_dir = str(node_config.get("state-dir") or
                        flwr_home / "fedlora" / f"partition-{partition_id}")
        return cls(partition_id, str(node_config.get("data", "")), state_dir,
                   str(node_config.get("model-cache", "")), int(node_config.get("threads", 0)),
                   str(node_config.get("device", "")))


def _quoted(value: str, key: str) -> str:
    """``value`` as a TOML string Flower's ``key=value`` parser accepts: it takes a quoted value
    up to the next quote of the same kind, so a JSON string if there is no ``"``, else a
    literal string."""
    if '"' not in value:
        return json.dumps(value)
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    raise CodecError(f"node config {key} {value!r} holds both quote kinds (or a newline and a quote)")
