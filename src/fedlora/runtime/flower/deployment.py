"""Flower's Deployment Engine on this machine, and submitting fedlora runs to a SuperLink.

:class:`LocalDeployment` starts ``flower-superlink`` and one ``flower-supernode`` per client
on 127.0.0.1 (free ports; plain, or TLS with SuperNode authentication when given the
certificates and the nodes' keys), each in its own session with a log file in
``<run dir>/logs``, and stops every process it started – including the SuperExec and app
processes Flower spawns in sessions of their own – on exit, error or Ctrl-C. It finds them by
a marker in their environment, which every descendant inherits. A launcher killed outright
(SIGKILL, power loss) cannot stop them: its direct children get SIGTERM from the kernel when it
dies, and the next deployment in the same run folder kills whatever still carries the marker
it left in ``logs/``.

:class:`FlowerConnection` submits a run to a SuperLink (local or, via :func:`connect`, an
existing deployment) with ``flwr run``: it writes a minimal Flower app (a ``pyproject.toml``
naming fedlora's ServerApp and ClientApp), keeps the CLI's configuration in
``FLWR_HOME=<run dir>/flwr`` and waits for the ServerApp's ``flower-run.json``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, NoReturn

import tomli_w

from fedlora.runtime.flower.settings import AppSettings, NodeSettings, run_model_cache
from fedlora.runtime.flower.server_app import RUN_STATUS_FILE

CONNECTION_NAME = "fedlora"
#: environment variable whose value marks every process of one LocalDeployment
MARKER_VARIABLE = "FEDLORA_FLOWER_DEPLOYMENT"
#: the marker of the run folder's last deployment, for the next one to clean up after a crash
MARKER_FILE = "deployment-marker"
_BIN = Path(sys.executable).parent  # the venv's flwr / flower-* scripts
SERVER_APP = "fedlora.runtime.flower.server_app:app"
CLIENT_APP = "fedlora.runtime.flower.client_app:app"


class FlowerRunError(RuntimeError):
    """A Flower run that failed or ended without a result; names the log to read."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a SuperLink serving TLS: the CA certificate every party trusts, and the
    SuperLink's certificate (valid for the address nodes dial) and private key."""

    ca_certificate: str
    certificate: str
    private_key: str


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair (OpenSSH files, an EC key on a NIST curve such as
    P-384): the node proves itself with the private key; the SuperLink lets in only nodes whose
    public key was registered (``flwr supernode register``)."""

    private_key: str
    public_key: str


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_app(app_dir: Path | str, settings: AppSettings, clientapp: str = CLIENT_APP) -> Path:
    """The Flower app ``flwr run`` submits: fedlora's ServerApp and ``clientapp`` (a
    ``module:attribute`` every SuperNode can import; fedlora's by default), with ``settings``
    as run config."""
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "project": {"name": "fedlora-flower", "version": "1.0.0", "license": "Apache-2.0",
                    "description": "fedlora rounds on the Flower Deployment Engine"},
        "tool": {"flwr": {"app": {
            "publisher": "fedlora",
            "components": {"serverapp": SERVER_APP, "clientapp": clientapp},
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
        self.root_certificates = str(Path(root_certificates).resolve()) if root_certificates else None
        # TLS: the SuperLink's CA certificate; without one the connection is plain (loopback only)
        connection = ({"address": address, "root-certificates": self.root_certificates}
                      if root_certificates else {"address": address, "insecure": insecure})
        config = {"superlink": {"default": CONNECTION_NAME, CONNECTION_NAME: connection}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")

    def _flwr(self, *args: str, timeout: float = 120.0) -> str:
        done = subprocess.run([str(_BIN / "flwr"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            self._fail(args, f"failed ({done.returncode}): {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def _flwr_json(self, *args: str) -> dict:
        """A ``--format json`` command's answer; flwr exits 0 even when it reports a failure."""
        answer = json.loads(self._flwr(*args, "--format", "json"))
        if not answer.get("success", True):
            self._fail(args, f"failed: {answer.get('error-message', '').strip()}")
        return answer

    def _fail(self, args: Sequence[str], what: str) -> NoReturn:
        # Flower says only "connection unavailable" for a TLS mismatch; say which it is
        problem = connection_problem(self.address, self.root_certificates)
        raise FlowerRunError(f"flwr {' '.join(args)} {what}" + (f"\n{problem}" if problem else ""))

    def submit(self, app_dir: Path | str) -> int:
        """Start a run of the app in ``app_dir``; returns its run id."""
        return int(self._flwr_json("run", str(app_dir), CONNECTION_NAME)["run-id"])

    def status(self, run_id: int) -> str:
        """The SuperLink's status of a run, e.g. ``running`` or ``finished:completed``."""
        return self._flwr_json("ls", CONNECTION_NAME, "--run-id", str(run_id))["runs"][0]["status"]

    def register_node(self, public_key: Path | str) -> int:
        """Let the SuperNode with this public key (OpenSSH file) in; returns its node id."""
        return int(self._flwr_json("supernode", "register", str(public_key), CONNECTION_NAME)["node-id"])

    def stop(self, run_id: int) -> None:
        self._flwr("stop", str(run_id), CONNECTION_NAME)

    def save_log(self, run_id: int) -> Path:
        """The ServerApp's output, fetched from the SuperLink into the log folder."""
        path = self.log_dir / f"serverapp-{run_id}.log"
        path.write_text(self._flwr("log", str(run_id), CONNECTION_NAME, "--show"), encoding="utf-8")
        return path

    def run_app(self, app_dir: Path | str, settings: AppSettings, *, clientapp: str = CLIENT_APP,
                poll: float = 0.5, status_every: float = 20.0, while_waiting: Callable[[], None] = lambda: None) -> dict:
        """Submit fedlora's app with ``settings``, wait for it and return its ``flower-run.json``;
        ``while_waiting`` is called at every look (the launcher follows the run's rows).

        An error or Ctrl-C while waiting stops the run on the SuperLink before re-raising.
        """
        status_path = Path(settings.run_dir) / RUN_STATUS_FILE
        status_path.unlink(missing_ok=True)
        run_id = self.submit(write_app(app_dir, settings, clientapp))
        try:
            return self._wait(run_id, status_path, poll, status_every, while_waiting)
        except BaseException:
            _quietly(self.stop, run_id)
            raise
        finally:
            _quietly(self.save_log, run_id)

    def _wait(self, run_id: int, status_path: Path, poll: float, status_every: float,
              while_waiting: Callable[[], None]) -> dict:
        next_check = time.monotonic() + status_every
        while not status_path.is_file():
            while_waiting()
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


def connection_problem(address: str, root_certificates: str | None) -> str | None:
    """Why a client could not talk to the SuperLink at ``address``, as far as TCP and TLS tell:
    nothing listening, TLS served to a plain client, no TLS for a TLS client, or a certificate
    the CA does not vouch for. None where neither explains it (the failure lies elsewhere)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        raw = socket.create_connection((host, int(port)), timeout=5.0)
    except (OSError, ValueError) as error:
        return f"nothing accepts connections at {address}: {error}"
    with raw:
        context = ssl.create_default_context(cafile=root_certificates)
        if root_certificates is None:  # a plain client: does the SuperLink serve TLS at all?
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        try:
            with context.wrap_socket(raw, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as error:
            return (f"the SuperLink at {address} serves TLS with a certificate the CA in {root_certificates} "
                    f"does not vouch for: {error.verify_message}")
        except (ssl.SSLError, OSError) as error:
            if root_certificates is None:
                return None  # no TLS there: plain is what this client speaks
            return f"the SuperLink at {address} does not serve TLS ({error}); connect without root_certificates"
    if root_certificates is None:
        return (f"the SuperLink at {address} serves TLS: give its CA certificate "
                "(root_certificates, `--root-certificates CA.crt`)")
    return None


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
    With ``gpus`` (CUDA device numbers or UUIDs) SuperNode i sees only ``gpus[i % len(gpus)]``
    (``CUDA_VISIBLE_DEVICES``) and trains on it (device ``cuda``): the nodes spread over the GPUs.
    With ``tls`` the SuperLink serves TLS and every party trusts its CA; with ``node_keys``
    (one per node, needs ``tls``) it also admits only SuperNodes whose public key it was given:
    each key is registered before its node starts.
    """

    def __init__(self, run_dir: Path | str, num_nodes: int,
                 node_configs: Sequence[NodeSettings] | None = None, *,
                 env: Mapping[str, str] | None = None, tls: TlsFiles | None = None,
                 node_keys: Sequence[NodeKey] | None = None, gpus: Sequence[str] = (),
                 startup_timeout: float = 60.0, stop_timeout: float = 3.0):
        self.run_dir = Path(run_dir)
        node_configs = list(node_configs or [NodeSettings(i) for i in range(num_nodes)])
        if len(node_configs) != num_nodes:
            raise ValueError(f"{len(node_configs)} node configs given for {num_nodes} SuperNodes")
        if node_keys is not None and (tls is None or len(node_keys) != num_nodes):
            raise ValueError(f"SuperNode authentication needs tls and one key per node "
                             f"({len(node_keys)} keys for {num_nodes} nodes)")
        self.tls = tls
        self.node_keys: list[NodeKey | None] = list(node_keys or [None] * num_nodes)
        # One model cache for all: the nodes share this machine, so one dequantised copy serves all.
        self.node_configs = [
            replace(node, state_dir=node.state_dir or str(self.run_dir / "nodes" / str(i)),
                    model_cache=node.model_cache or str(run_model_cache(self.run_dir)),
                    device="cuda" if gpus else node.device)
            for i, node in enumerate(node_configs)]
        self.gpus = list(gpus)
        self.marker = uuid.uuid4().hex
        self.env = {**(env or {}), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    MARKER_VARIABLE: self.marker}
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.log_dir = self.run_dir / "logs"
        self.connection: FlowerConnection | None = None
        self.address = ""  # HOST:PORT of the SuperLink, once started
        self.registered_ids: list[int] = []  # node ids the SuperLink gave the registered keys
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self._node_ports: list[int] = []
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
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stop_stale_deployment(self.log_dir / MARKER_FILE)
        (self.log_dir / MARKER_FILE).write_text(self.marker, encoding="utf-8")
        # there, the ServerApp dequantises a GGUF model once before any SuperNode loads it
        run_model_cache(self.run_dir).mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        tls = self.tls
        self.connection = FlowerConnection(self.run_dir / "flwr", self.address, log_dir=self.log_dir,
                                           root_certificates=tls.ca_certificate if tls else None, env=self.env)
        security = ["--ssl-ca-certfile", tls.ca_certificate, "--ssl-certfile", tls.certificate,
                    "--ssl-keyfile", tls.private_key] if tls else ["--insecure"]
        if any(self.node_keys):
            security.append("--enable-supernode-auth")
        self.superlink = self._spawn("superlink", ["flower-superlink", *security, "--host", "127.0.0.1",
                                                   "--port", str(port)])
        self._wait_for_port(self.superlink, port, "superlink")
        with ThreadPoolExecutor() as pool:  # one flwr process per key, at once
            self.registered_ids = list(pool.map(self.connection.register_node,
                                                [key.public_key for key in self.node_keys if key]))
        for i in range(len(self.node_configs)):
            self.supernodes.append(self._spawn_node(i))
        for i, process in enumerate(self.supernodes):
            self._wait_for_port(process, self._node_ports[i], f"supernode-{i}")

    def _spawn_node(self, index: int) -> subprocess.Popen:
        """Start SuperNode ``index`` (not waiting for it) on a fresh runtime-API port."""
        port = free_port()
        self._node_ports[index:index + 1] = [port]
        key = self.node_keys[index]
        security = ["--root-certificates", self.tls.ca_certificate] if self.tls else ["--insecure"]
        if key is not None:
            security += ["--auth-supernode-private-key", key.private_key]
        # its ClientApp processes inherit the SuperNode's environment, so they see its GPU alone
        gpu = {"CUDA_VISIBLE_DEVICES": self.gpus[index % len(self.gpus)]} if self.gpus else {}
        return self._spawn(f"supernode-{index}", [
            "flower-supernode", *security, "--superlink", self.address, "--port", str(port),
            "--node-config", self.node_configs[index].to_node_config()], env=gpu)

    def _spawn(self, name: str, command: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # closed in close()
        self._logs.append(log)
        # own session: Ctrl-C in the terminal reaches only us, and we stop the group in order
        return subprocess.Popen([str(_BIN / command[0]), *command[1:]], env={**self.connection.env, **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_terminate_with_parent)

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

    def run_app(self, app_dir: Path | str, settings: AppSettings, **options) -> dict:
        """Run fedlora's Flower app on this deployment; see :meth:`FlowerConnection.run_app`."""
        return self.connection.run_app(app_dir, settings, **options)

    def kill_node(self, index: int) -> None:
        """SIGKILL SuperNode ``index`` and its children, as a crash would."""
        _signal_group(self.supernodes[index], signal.SIGKILL)
        self.supernodes[index].wait()

    def restart_node(self, index: int) -> None:
        """Start SuperNode ``index`` again (killing it first if it runs), with its config, key and
        state dir: it joins under a new node id, as a rebooted machine would."""
        self.kill_node(index)
        self.supernodes[index] = self._spawn_node(index)
        self._wait_for_port(self.supernodes[index], self._node_ports[index], f"supernode-{index}")

    def close(self) -> None:
        """Stop every process of this deployment: SIGTERM, then SIGKILL after ``stop_timeout``
        (Flower's processes often ignore SIGTERM, and nothing of theirs needs a clean exit: the
        SuperLink's state is in memory, fedlora's files are written atomically)."""
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


def stop_stale_deployment(marker_file: Path) -> None:
    """SIGKILL what is left of the deployment that wrote ``marker_file`` (a launcher killed
    before it could stop its processes), so that none of it writes into a resumed run."""
    if not marker_file.is_file():
        return
    marker = marker_file.read_text(encoding="utf-8").strip()
    for pid in marked_processes(marker):
        _quietly(os.kill, pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.1)


_PR_SET_PDEATHSIG = 1
# looked up here, not in the forked child, which should run as little as it can before exec
_prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


def _terminate_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM it when the thread that started it ends, i.e.
    when the launcher dies however it dies (spawn from a thread that outlives the deployment)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


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
