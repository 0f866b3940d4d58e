"""One real deployment that holds: a SuperLink on TLS with SuperNode authentication, keys and
certificates made here, an honest SuperNode, one that replays, four hostile ones, and two that
must stay out.

All tests of this module read the same run (module fixture ``secure_run``): starting Flower
processes costs most of a test's time. The hostile nodes run ``hostile_client_app``, named as
the run's ClientApp; the honest ones run fedlora's ClientApp through it unchanged.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedlora.engine.config import build_config, save_config
from fedlora.engine.restore import restore_global_model
from fedlora.engine.setup import prepare_run
from fedlora.models import model_shapes
from fedlora.engine.metrics import read_metrics
from fedlora.runtime.flower import runner
from fedlora.runtime.flower.deployment import FlowerRunError, LocalDeployment, NodeKey, TlsFiles, connect, \
    free_port

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

HONEST = ["0"]
#: partition → behaviour in rounds 1 and 2, and the rule each must be rejected under
PLANS = {"1": ["honest", "replay"], "2": ["nan", "shape"], "3": ["rank-10x", "float64"],
         "4": ["extra-arrays", "missing-array"], "5": ["examples-1e12", "garbage"]}
RULES = {"nan": "finite", "shape": "shape", "rank-10x": "shape", "float64": "dtype", "extra-arrays": "modules",
         "missing-array": "record", "examples-1e12": "num_examples", "garbage": "record", "replay": "replay"}
SETTINGS = {"model": "tiny-llama", "rounds": 2, "fraction": 1.0, "ranks": [2], "local_steps": 1, "batch_size": 2,
            "max_length": 32, "lr": 1e-2, "min_clients": 1, "max_examples": 1000, "client_timeout": 120.0}


# --- certificates and keys, made for this run ---------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: x509.Name, signer, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    return builder.sign(signer, hashes.SHA384())


def write_pem(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def make_ca(folder: Path, name: str) -> tuple[str, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    certificate = _certificate(name, key, _name(name), key, ca=True)
    return write_pem(folder / f"{name}.crt", certificate.public_bytes(serialization.Encoding.PEM)), certificate, key


def make_tls(folder: Path) -> TlsFiles:
    """A CA and the SuperLink's certificate for 127.0.0.1 signed by it."""
    ca_file, ca, ca_key = make_ca(folder, "ca")
    key = ec.generate_private_key(ec.SECP384R1())
    certificate = _certificate("127.0.0.1", key, ca.subject, ca_key, ca=False)
    return TlsFiles(ca_file, write_pem(folder / "superlink.pem", certificate.public_bytes(serialization.Encoding.PEM)),
                    write_pem(folder / "superlink.key", key.private_bytes(
                        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())))


def make_node_key(folder: Path, name: str) -> NodeKey:
    """A P-384 key pair in the OpenSSH files flower-supernode and `flwr supernode register` read."""
    key = ec.generate_private_key(ec.SECP384R1())
    return NodeKey(write_pem(folder / f"{name}.key", key.private_bytes(
                       serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())),
                   write_pem(folder / f"{name}.pub", key.public_key().public_bytes(
                       serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)))


# --- the run ------------------------------------------------------------------------------

def write_clients(folder: Path, count: int) -> Path:
    folder.mkdir()
    for client in range(count):
        records = [{"instruction": f"Client {client}, question {i}: name a colour.", "context": "",
                    "response": f"Answer {i}: {'red green blue'.split()[(i + client) % 3]}.", "category": "c"}
                   for i in range(6 + 2 * client)]
        (folder / f"local_training_{client}.json").write_text(json.dumps(records))
    (folder / "global_test.json").write_text(json.dumps(records[:4]))
    return folder


def stray_supernode(deployment: LocalDeployment, name: str, security: list[str], partition: int):
    """A SuperNode this deployment did not start, dialling its SuperLink; it should exit."""
    log = open(deployment.log_dir / f"{name}.log", "wb")
    process = subprocess.Popen([str(BIN / "flower-supernode"), *security, "--superlink", deployment.address,
                                "--port", str(free_port()), "--node-config", f"partition-id={partition}"],
                               env=deployment.connection.env, stdout=log, stderr=subprocess.STDOUT)
    return process, log


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    keys_dir = root / "keys"
    keys_dir.mkdir()
    tls = make_tls(keys_dir)
    data = write_clients(root / "clients", len(HONEST) + len(PLANS))
    run_dir = root / "run"
    run_dir.mkdir()
    config = build_config({**SETTINGS, "data": str(data), "out": str(run_dir)})
    save_config(config, run_dir / "config.json")
    nodes = runner.node_settings(config)
    keys = [make_node_key(keys_dir, f"node-{i}") for i in range(len(nodes))]
    plan = {"plans": PLANS, "shapes": {m: list(shape) for m, shape in
                                       model_shapes("tiny-llama", config.target_modules).items()}}
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "FEDLORA_TEST_HOSTILE": json.dumps(plan)}
    with LocalDeployment(run_dir, len(nodes), nodes, env=env, tls=tls, node_keys=keys) as deployment:
        # while the run starts: a node with a key never registered, claiming an honest partition,
        # and a registered node that does not trust the CA
        strays = {"unregistered": stray_supernode(deployment, "unregistered", [
                      "--root-certificates", tls.ca_certificate,
                      "--auth-supernode-private-key", make_node_key(keys_dir, "stranger").private_key], 0),
                  "no-ca": stray_supernode(deployment, "no-ca", [
                      "--auth-supernode-private-key", keys[1].private_key], 1)}
        outcome = deployment.run_app(run_dir / "flower-app", runner.app_settings(config, run_dir),
                                     clientapp="hostile_client_app:app")
        for process, log in strays.values():  # Flower reports exit code 305 but lingers, retrying
            process.kill()
            process.wait()
            log.close()
        client_errors = {}
        for name, ca in (("plain client", None), ("client with another CA", make_ca(keys_dir, "other-ca")[0])):
            with pytest.raises(FlowerRunError) as error:
                connect(root / name.replace(" ", "-"), deployment.address, root_certificates=ca).status(1)
            client_errors[name] = str(error.value)
        registered = list(deployment.registered_ids)
    logs = {path.stem: path.read_text(errors="replace") for path in (run_dir / "logs").glob("*.log")}
    return {"config": config, "run_dir": run_dir, "outcome": outcome, "logs": logs,
            "client_errors": client_errors, "registered": registered}


def test_tls_with_supernode_auth_runs_two_rounds_with_only_the_registered_nodes(secure_run):
    rows = read_metrics(secure_run["run_dir"])
    assert [row["round"] for row in rows] == [0, 1, 2] and not any(row["skipped"] for row in rows)
    assert "--insecure" not in secure_run["logs"]["superlink"]
    assert "SuperNode authentication is disabled" not in secure_run["logs"]["superlink"]
    # every partition is held by the node its registered key identifies, the stranger's claim on 0 included
    nodes = secure_run["outcome"]["flower"]["nodes"]
    assert sorted(nodes) == sorted(HONEST + list(PLANS))
    assert sorted(nodes.values()) == sorted(secure_run["registered"])
    assert "Exit Code: 305" in secure_run["logs"]["unregistered"]
    assert "Failed to activate SuperNode" in secure_run["logs"]["unregistered"]
    # the final sync brings every replica, hostile nodes' included, to the last round
    assert not secure_run["outcome"]["flower"]["sync_failures"]
    assert secure_run["outcome"]["flower"]["replica_round"] == dict.fromkeys(HONEST + list(PLANS), 2)


def test_a_client_without_the_ca_fails_with_a_clear_message(secure_run):
    assert "SSL/TLS handshake error" in secure_run["logs"]["no-ca"]
    assert "CERTIFICATE_VERIFY_FAILED" in secure_run["logs"]["no-ca"]
    errors = secure_run["client_errors"]
    assert "serves TLS: give its CA certificate" in errors["plain client"]
    assert "does not vouch for: unable to get local issuer certificate" in errors["client with another CA"]


def test_hostile_nodes_are_rejected_by_rule_and_each_round_is_the_honest_aggregate(secure_run, tmp_path):
    rows = read_metrics(secure_run["run_dir"])
    for server_round in (1, 2):
        row = rows[server_round]
        behaving = [p for p, plan in PLANS.items() if plan[server_round - 1] == "honest"]
        assert row["clients"] == HONEST + behaving
        assert sorted((r["client_id"], r["rule"]) for r in row["rejected"]) == sorted(
            (p, RULES[plan[server_round - 1]]) for p, plan in PLANS.items() if plan[server_round - 1] != "honest")
        assert not row["failures"]

    # the reference: the same run in this process, aggregating only the honest replies
    setup = prepare_run(secure_run["config"].replace(out=str(tmp_path)), tmp_path, log=lambda message: None)
    federation = setup.federation
    federation.start()
    for server_round in (1, 2):
        honest = [task for task in federation.configure_train(server_round) if task.client_id in rows[server_round]["clients"]]
        reference = federation.aggregate_train(
            server_round, [setup.trainer.train(task, setup.client_examples[task.client_id]) for task in honest]).to_json()
        for key in ("train_loss", "eval_loss"):
            assert reference[key] == rows[server_round][key], (server_round, key)
    server = restore_global_model(secure_run["run_dir"]).global_model.adapted_weights()
    for name, weight in federation.global_model.adapted_weights().items():
        assert (server[name] - weight).abs().max() <= 1e-6, name
