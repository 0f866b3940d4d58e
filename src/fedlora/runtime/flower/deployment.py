"""Flower's Deployment Engine on this machine, and submitting fedlora runs to a SuperLink.

:class:`LocalDeployment` starts ``flower-superlink`` and one ``flower-supernode`` per client
on 127.0.0.1 (free ports, ``--insecure``), each in its own session with a log file in
``<run dir>/logs``, and stops every process it started – including the SuperExec and app
processes Flower spawns in sessions of their own – on exit, error or Ctrl-C. It finds them by
a marker in their environment, which every descendant inherits.

:class:`FlowerConnection` submits a run to a SuperLink (local or, via :func:`connect`, an
existing deployment) with ``flwr run``: it writes a minimal Flower app (a ``pyproject.toml``
naming fedlora's ServerApp and ClientApp), keeps the CLI's configuration in
``FLWR_HOME=<run dir>/flwr`` and waits for the ServerApp's ``flower-run.json``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO

import tomli_w

from fedlora.runtime.flower.codec import AppSettings, NodeSettings, run_model_cache
from fedlora.runtime.flower.server_app import RUN_STATUS_FILE

CONNECTION_NAME = "fedlora"
#: environment variable whose value marks every process of one LocalDeployment
MARKER_VARIABLE = "FEDLORA_FLOWER_DEPLOYMENT"
_BIN = Path(sys.executable).parent  # the venv's flwr / flower-* scripts


class FlowerRunError(RuntimeError):
    """A Flower run that failed or ended without a result; names the log to read."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_app(app_dir: Path | str, settings: AppSettings) -> Path:
    """The Flower app ``flwr run`` submits: fedlora's apps, with ``settings`` as run config."""
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "project": {"name": "fedlora-flower", "version": "1.0.0", "license": "Apache-2.0",
                    "description": "fedlora rounds on the Flower Deployment Engine"},
        "tool": {"flwr": {"app": {
            "publisher": "fedlora",
            "components": {"serverapp": "fedlora.runtime.flower.server_app:app",
                           "clientapp": "fedlora.runtime.flower.client_app:app"},
            "config": settings.to_run_config(),
        }}},
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    return app_dir


class FlowerConnection:
    """The ``flwr`` CLI pointed at one SuperLink through a config file in ``flwr_home``."""

    def __init__(self, flwr_home: Path | str, address: str, *, log_dir: Path | str,
                 insecure: bool = True, root_certificates: str | None = None,
                 env: Mapping[str, str] | None = None):
        self.flwr_home = Path(flwr_home)
        self.address = address
        self.log_dir = Path(log_dir)
        # Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name
        path = os.pathsep.join([str(_BIN), os.environ.get("PATH", "")])
        self.env = {**os.environ, **(env or {}), "FLWR_HOME": str(self.flwr_home), "PATH": path}
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # TLS: the SuperLink's CA certificate; without one the connection is plain (loopback only)
        connection = ({"address": address, "root-certificates": str(Path(root_certificates).resolve())}
                      if root_certificates else {"address": address, "insecure": insecure})
        config = {"superlink": {"default": CONNECTION_NAME, CONNECTION_NAME: connection}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")

    def _flwr(self, *args: str, timeout: float = 120.0) -> str:
        done = subprocess.run([str(_BIN / "flwr"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise FlowerRunError(f"flwr {' '.join(args)} failed ({done.returncode}): "
                                 f"{(done.stderr or done.stdout).strip()}")
        return done.stdout

    def submit(self, app_dir: Path | str) -> int:
        """Start a run of the app in ``app_dir``; returns its run id."""
        out = self._flwr("run", str(app_dir), CONNECTION_NAME, "--format", "json")
        return int(json.loads(out)["run-id"])

    def status(self, run_id: int) -> str:
        """The SuperLink's status of a run, e.g. ``running`` or ``finished:completed``."""
        out = self._flwr("ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json")
        return json.loads(out)["runs"][0]["status"]

    def stop(self, run_id: int) -> None:
        self._flwr("stop", str(run_id), CONNECTION_NAME)

    def save_log(self, run_id: int) -> Path:
        """The ServerApp's output, fetched from the SuperLink into the log folder."""
        path = self.log_dir / f"serverapp-{run_id}.log"
        path.write_text(self._flwr("log", str(run_id), CONNECTION_NAME, "--show"), encoding="utf-8")
        return path

    def run_app(self, app_dir: Path | str, settings: AppSettings, *, poll: float = 0.5,
                status_every: float = 20.0) -> dict:
        """Submit fedlora's app with ``settings``, wait for it and return its ``flower-run.json``.

        An error or Ctrl-C while waiting stops the run on the SuperLink before re-raising.
        """
        status_path = Path(settings.run_dir) / RUN_STATUS_FILE
        status_path.unlink(missing_ok=True)
        run_id = self.submit(write_app(app_dir, settings))
        try:
            return self._wait(run_id, status_path, poll, status_every)
        except BaseException:
            _quietly(self.stop, run_id)
            raise
        finally:
            _quietly(self.save_log, run_id)

    def _wait(self, run_id: int, status_path: Path, poll: float, status_every: float) -> dict:
        next_check = time.monotonic() + status_every
        while not status_path.is_file():
            if time.monotonic() >= next_check:
                # the status file is the fast path; the SuperLink tells us if the ServerApp died
                if self.status(run_id).startswith("finished") and not status_path.is_file():
                    raise FlowerRunError(f"run {run_id} finished without writing {status_path}; see "
                                         f"{self.log_dir / f'serverapp-{run_id}.log'}")
                next_check = time.monotonic() + status_every
            time.sleep(poll)
        outcome = json.loads(status_path.read_text(encoding="utf-8"))
        if outcome["status"] != "completed":
            raise FlowerRunError(f"run {run_id} failed: {outcome.get('error')}; see "
                                 f"{self.log_dir / f'serverapp-{run_id}.log'}")
        return outcome


def connect(run_dir: Path | str, superlink_address: str, *, root_certificates: str | None = None,
            env: Mapping[str, str] | None = None) -> FlowerConnection:
    """A connection to an existing deployment's SuperLink (``HOST:PORT`` of its Control API),
    over TLS when ``root_certificates`` (the CA certificate) is given."""
    run_dir = Path(run_dir)
    return FlowerConnection(run_dir / "flwr", superlink_address, log_dir=run_dir / "logs",
                            insecure=root_certificates is None, root_certificates=root_certificates, env=env)


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, for the length of a ``with``.

    ``node_configs[i]`` is SuperNode i's partition, data and state dir (default: partition i,
    state in ``<run dir>/nodes/<i>``). ``env`` adds environment variables for all processes.
    """

    def __init__(self, run_dir: Path | str, num_nodes: int,
                 node_configs: Sequence[NodeSettings] | None = None, *,
                 env: Mapping[str, str] | None = None, startup_timeout: float = 60.0,
                 stop_timeout: float = 10.0):
        self.run_dir = Path(run_dir)
        node_configs = list(node_configs or [NodeSettings(i) for i in range(num_nodes)])
        if len(node_configs) != num_nodes:
            raise ValueError(f"{len(node_configs)} node configs given for {num_nodes} SuperNodes")
        # One model cache for all: the nodes share this machine, so one dequantised copy serves all.
        self.node_configs = [
            replace(node, state_dir=node.state_dir or str(self.run_dir / "nodes" / str(i)),
                    model_cache=node.model_cache or str(run_model_cache(self.run_dir)))
            for i, node in enumerate(node_configs)]
        self.marker = uuid.uuid4().hex
        self.env = {**(env or {}), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    MARKER_VARIABLE: self.marker}
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.log_dir = self.run_dir / "logs"
        self.connection: FlowerConnection | None = None
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self._logs: list[IO] = []

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start(self) -> None:
        # there, the ServerApp dequantises a GGUF model once before any SuperNode loads it
        run_model_cache(self.run_dir).mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.connection = FlowerConnection(self.run_dir / "flwr", f"127.0.0.1:{port}",
                                           log_dir=self.log_dir, env=self.env)
        self.superlink = self._spawn("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                                                   "--port", str(port)])
        self._wait_for_port(self.superlink, port, "superlink")
        node_ports = []
        for i, node in enumerate(self.node_configs):
            node_ports.append(free_port())
            self.supernodes.append(self._spawn(f"supernode-{i}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--port", str(node_ports[-1]), "--node-config", node.to_node_config()]))
        for i, (process, node_port) in enumerate(zip(self.supernodes, node_ports)):
            self._wait_for_port(process, node_port, f"supernode-{i}")

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # closed in close()
        self._logs.append(log)
        # own session: Ctrl-C in the terminal reaches only us, and we stop the group in order
        return subprocess.Popen([str(_BIN / command[0]), *command[1:]], env=self.connection.env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)

    def _wait_for_port(self, process: subprocess.Popen, port: int, name: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise FlowerRunError(f"{name} exited with {process.returncode} at startup; see "
                                     f"{self.log_dir / f'{name}.log'}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise FlowerRunError(f"{name} did not listen on port {port} within {self.startup_timeout:g} s; "
                             f"see {self.log_dir / f'{name}.log'}")

    def run_app(self, app_dir: Path | str, settings: AppSettings) -> dict:
        """Run fedlora's Flower app on this deployment; see :meth:`FlowerConnection.run_app`."""
        return self.connection.run_app(app_dir, settings)

    def kill_node(self, index: int) -> None:
        """SIGKILL SuperNode ``index`` and its children, as a crash would."""
        _signal_group(self.supernodes[index], signal.SIGKILL)
        self.supernodes[index].wait()

    def close(self) -> None:
        """Stop every process of this deployment: SIGTERM, then SIGKILL after ``stop_timeout``."""
        for process in [*self.supernodes, *filter(None, [self.superlink])]:
            _signal_group(process, signal.SIGTERM)
        # Flower's SuperExec and app processes run in sessions of their own: find them by marker
        for pid in marked_processes(self.marker):
            _quietly(os.kill, pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while marked_processes(self.marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in marked_processes(self.marker):
            _quietly(os.kill, pid, signal.SIGKILL)
        for process in [*self.supernodes, *filter(None, [self.superlink])]:
            process.wait()
        for log in self._logs:
            log.close()
        self._logs = []


def marked_processes(marker: str) -> list[int]:
    """Live processes (of this user) whose environment carries ``marker``."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and not _is_zombie(entry):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def _is_zombie(proc_entry: Path) -> bool:
    # the state follows the parenthesised command name, which may itself hold spaces
    return (proc_entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    if process.poll() is None:
        _quietly(os.killpg, process.pid, signum)


def _quietly(function, *args) -> None:
    """Best-effort cleanup: a process already gone or a SuperLink already down is fine."""
    try:
        function(*args)
    except (OSError, FlowerRunError, subprocess.TimeoutExpired):
        pass
