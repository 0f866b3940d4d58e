"""Churn at scale on Flower's Deployment Engine: 24 SuperNodes on 127.0.0.1, tiny-llama, 10
rounds, a third of the nodes SIGKILLed and restarted at random moments.

Checks, and writes to benchmarks/results/flower_churn.md (JSON beside it):
- every round completes or is skipped, and every failure has its reason in metrics.jsonl;
- at the end every node's replica (rebuilt from its log, as its ClientApp does) equals the
  server's model, restarted nodes included;
- peak memory: the proportional set size (PSS: shared pages split among their sharers) of
  every process of the deployment and this launcher summed, sampled each second; and each
  kind's largest single process (RSS).

The deployment is started and churned from the main thread (the nodes die with the thread that
started them); the run waits in another. Run from the repository root: ``make bench-flower``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

from common import dolly_client_files, environment_line, markdown_table, require_shared_data, write_result

NODES = 24
ROUNDS = 10
RUN = {"model": "tiny-llama", "clients_per_round": 6, "min_clients": 3, "ranks": [4],
       "local_steps": 1, "batch_size": 2, "max_length": 48, "lr": 1e-2, "seed": 0, "test_limit": 16,
       # a dead node's message waits for the SuperLink to give up on it, at most this long
       "client_timeout": 180.0}
RECORDS_PER_CLIENT = 12
SEED = 7


def write_clients(folder: Path, count: int) -> Path:
    """``count`` client files of Dolly records (the shared clients' records, dealt in turn)."""
    pooled = [record for file in dolly_client_files() for record in json.loads(file.read_text())]
    folder.mkdir(parents=True)
    for client in range(count):
        records = pooled[client::count][:RECORDS_PER_CLIENT]
        (folder / f"local_training_{client:02d}.json").write_text(json.dumps(records))
    (folder / "global_test.json").write_text(json.dumps(pooled[-16:]))
    return folder


class MemorySampler(threading.Thread):
    """Each second: the summed PSS of the deployment's processes (by marker) and this one."""

    def __init__(self, marker: str):
        super().__init__(daemon=True)
        self.marker = marker
        self.peak_total_mb = 0.0
        self.peak_by_kind: dict[str, float] = defaultdict(float)
        self.stopped = threading.Event()

    def run(self) -> None:
        from fedlora.runtime.flower.deployment import marked_processes

        while not self.stopped.wait(1.0):
            total = memory_mb(os.getpid(), "smaps_rollup", "Pss:")
            for pid in marked_processes(self.marker):
                total += memory_mb(pid, "smaps_rollup", "Pss:")
                kind = process_kind(pid)
                if kind:  # not gone meanwhile
                    self.peak_by_kind[kind] = max(self.peak_by_kind[kind], memory_mb(pid, "status", "VmRSS:"))
            self.peak_total_mb = max(self.peak_total_mb, total)


def memory_mb(pid: int, proc_file: str, field: str) -> float:
    """A ``kB`` field of /proc/PID/PROC_FILE in MB; 0 for a process gone meanwhile."""
    try:
        for line in Path(f"/proc/{pid}/{proc_file}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def process_kind(pid: int) -> str:
    """The script a Flower process runs (``flower-supernode``, ``flwr-clientapp`` …); '' if gone."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    return Path(command[1].decode()).name if len(command) > 1 and command[1] else ""


def churn_plan(rng: random.Random, nodes: int, rounds: int) -> list[tuple[int, int, float, float]]:
    """For a third of the nodes: (node, round in which it dies, seconds into that round,
    seconds it stays down)."""
    churned = rng.sample(range(nodes), nodes // 3)
    return sorted(((node, rng.randint(1, rounds - 1), rng.uniform(0.0, 20.0), rng.uniform(5.0, 60.0))
                   for node in churned), key=lambda event: (event[1], event[2]))


def rows_written(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def churn(deployment, run_dir: Path, plan, done: threading.Event) -> list[dict]:
    """Kill and restart nodes as ``plan`` says; round r is under way once r rows are written
    (round 0 is the first). Returns what was done, with times."""
    started = time.monotonic()
    pending = list(plan)
    down: list[tuple[float, int]] = []  # (restart at, node)
    log = []
    round_started: dict[int, float] = {}
    while (pending or down) and not done.is_set():
        now = time.monotonic()
        current = rows_written(run_dir)
        round_started.setdefault(current, now)
        while pending and (current > pending[0][1] or (
                current == pending[0][1] and now - round_started[current] >= pending[0][2])):
            node, server_round, _, downtime = pending.pop(0)
            deployment.kill_node(node)
            down.append((now + downtime, node))
            log.append({"node": node, "killed_in_round": server_round, "at_s": round(now - started, 1),
                        "down_s": round(downtime, 1)})
        for restart_at, node in sorted(down):
            if now >= restart_at:
                deployment.restart_node(node)
                down.remove((restart_at, node))
                next(entry for entry in log if entry["node"] == node)["restarted_at_s"] = round(
                    time.monotonic() - started, 1)
        time.sleep(0.2)
    return log


def replicas_equal_the_server(run_dir: Path, nodes: int) -> dict[int, bool]:
    from fedlora.engine.client import LocalTrainer
    from fedlora.engine.restore import restore_global_model
    from fedlora.eval.loss import pad_token_id
    from fedlora.models import load_model
    from fedlora.runtime.flower.client_app import ReplicaLog

    (server_log,) = (run_dir / "logs").glob("serverapp-*.log")
    flower_run = server_log.stem.removeprefix("serverapp-")
    server = restore_global_model(run_dir).global_model.adapted_weights()
    equal = {}
    for node in range(nodes):
        model, tokenizer = load_model("tiny-llama")
        trainer = LocalTrainer(model, pad_token_id(tokenizer), target_modules=["q_proj", "v_proj"], batch_size=2)
        ReplicaLog(run_dir / "nodes" / str(node) / f"run-{flower_run}").replay(trainer)
        equal[node] = all(torch.equal(trainer.model.get_submodule(name).weight, weight)
                          for name, weight in server.items())
    return equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the run (default: a temporary one)")
    parser.add_argument("--nodes", type=int, default=NODES, help="SuperNodes (a third of them churn)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    require_shared_data()
    from fedlora.engine.config import build_config, save_config
    from fedlora.engine.metrics import read_metrics
    from fedlora.runtime.flower import runner
    from fedlora.runtime.flower.deployment import LocalDeployment

    load = os.getloadavg()[0]
    work = args.work or Path(tempfile.mkdtemp(prefix="flower-churn-"))
    run_dir = work / "run"
    run_dir.mkdir(parents=True)
    data = write_clients(work / "clients", args.nodes)
    config = build_config({**RUN, "rounds": args.rounds, "clients_per_round": min(RUN["clients_per_round"], args.nodes),
                           "data": str(data), "out": str(run_dir)}, source="benchmark")
    save_config(config, run_dir / "config.json")
    nodes = runner.node_settings(config)
    plan = churn_plan(random.Random(SEED), args.nodes, args.rounds)
    started = time.monotonic()
    outcome: dict = {}
    done = threading.Event()
    with LocalDeployment(run_dir, len(nodes), nodes, env={"OMP_NUM_THREADS": "1"}) as deployment:
        sampler = MemorySampler(deployment.marker)
        sampler.start()

        def run_app() -> None:
            try:
                outcome.update(deployment.run_app(run_dir / "flower-app", runner.app_settings(config, run_dir)))
            finally:
                done.set()
        waiter = threading.Thread(target=run_app)
        waiter.start()
        churned = churn(deployment, run_dir, plan, done)
        waiter.join()
        sampler.stopped.set()
    seconds = time.monotonic() - started
    if not outcome:
        sys.exit(f"the run failed; see {run_dir / 'logs'}")
    rows = read_metrics(run_dir)[1:]
    replicas = replicas_equal_the_server(run_dir, args.nodes)
    result = {"nodes": args.nodes, "rounds": args.rounds, "run": RUN, "churn": churned, "seconds": seconds,
              "peak_total_pss_mb": sampler.peak_total_mb, "peak_rss_mb_by_kind": dict(sampler.peak_by_kind),
              "rows": [{key: row[key] for key in ("round", "clients", "failures", "rejected", "skipped", "seconds")}
                       for row in rows],
              "replicas_equal": replicas, "sync_failures": outcome["flower"]["sync_failures"],
              "load_average_at_start": load}
    write_result("flower_churn.json", json.dumps(result, indent=1))
    text = report(result, environment_line(int(os.environ.get("OMP_NUM_THREADS", "1")), load))
    write_result("flower_churn.md", text)
    print(text)
    if len(rows) != args.rounds or not all(replicas.values()) or outcome["flower"]["sync_failures"]:
        sys.exit("churn benchmark: rounds missing or replicas differ from the server")


def report(result: dict, environment: str) -> str:
    rows = result["rows"]
    equal = sum(result["replicas_equal"].values())
    lines = [
        "# Flower churn benchmark", "", environment, "",
        f"{result['nodes']} SuperNodes and a SuperLink on 127.0.0.1, tiny-llama, FLoRA rank {RUN['ranks'][0]}, "
        f"{result['rounds']} rounds of {RUN['clients_per_round']} sampled clients × {RUN['local_steps']} step "
        f"(min_clients {RUN['min_clients']}, client_timeout {RUN['client_timeout']:g} s). {len(result['churn'])} "
        f"nodes (a third) SIGKILLed at random moments of random rounds and restarted 5–60 s later with their "
        f"state dir (seed {SEED}). Generated by `benchmarks/flower_churn.py` (`make bench-flower`) in "
        f"{result['seconds'] / 60:.1f} min.", "",
        f"- rounds completed: {sum(not r['skipped'] for r in rows)} of {result['rounds']}; skipped: "
        f"{sum(r['skipped'] for r in rows)}; every failure below carries its reason in metrics.jsonl",
        f"- replicas equal to the server's model at the end (bit for bit): {equal} of {result['nodes']}; "
        f"failed final syncs: {len(result['sync_failures'])}",
        f"- peak memory, every process of the deployment and the launcher (PSS summed, sampled each second): "
        f"{result['peak_total_pss_mb']:.0f} MB; largest single process (RSS) by kind: " + ", ".join(
            f"{kind} {mb:.0f} MB" for kind, mb in sorted(result["peak_rss_mb_by_kind"].items(), key=lambda kv: -kv[1])
            if mb > 0),
        "", "## Rounds", "",
        *markdown_table(["round", "clients", "failed (reason)", "rejected", "skipped", "seconds"], [
            (r["round"], len(r["clients"]),
             "; ".join(f"{f['client_id']}: {f['reason']}" for f in r["failures"]) or "—",
             len(r["rejected"]), "yes" if r["skipped"] else "no", f"{r['seconds']:.0f}") for r in rows], "rrlrrr"),
        "", "## Churn", "",
        *markdown_table(["node", "killed in round", "at s", "down s", "restarted at s"], [
            (c["node"], c["killed_in_round"], c["at_s"], c["down_s"], c.get("restarted_at_s", "—"))
            for c in result["churn"]]),
        ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
