"""A ClientApp for tests: fedlora's own, except on the SuperNodes a plan names, whose train
replies are hostile. A test's Flower app names it (``hostile_client_app:app``) instead of
fedlora's ClientApp; fedlora's code has no hook for it.

The plan is JSON in the environment variable ``FEDLORA_TEST_HOSTILE``: ``shapes`` (the dense
shape of every adapted module) and ``plans`` (partition id → one behaviour per round). A
hostile node does not train: it makes an update of the assigned rank and scale, then breaks it
as its behaviour says. ``honest`` runs fedlora's train and keeps the reply, which ``replay``
sends again in a later round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file, save_file

from fedlora.aggregation import ClientUpdate, LoraFactors, factors_to_tensors, tensors_to_factors
from fedlora.engine.task import ClientResult, ClientTask
from fedlora.runtime.flower import client_app as fedlora_app
from fedlora.runtime.flower.wire import IDENTIFY_ACTION, SYNC_ACTION, UPDATE_KEY, decode_result, decode_task, \
    encode_result, get_catchup

PLAN_VARIABLE = "FEDLORA_TEST_HOSTILE"
#: a module tiny-llama has but fedlora does not adapt here
STRAY_MODULE = "model.layers.0.self_attn.k_proj"

app = ClientApp()
app.query(IDENTIFY_ACTION)(fedlora_app.identify)
app.query(SYNC_ACTION)(fedlora_app.sync)


@app.train()
def train(message: Message, context: Context) -> Message:
    node, replica = fedlora_app.node_replica(context)
    plan = json.loads(os.environ.get(PLAN_VARIABLE, "{}"))
    task = decode_task(message.content)
    behaviour = plan.get("plans", {}).get(str(node.partition_id), ["honest"] * task.server_round)[task.server_round - 1]
    kept = replica.directory / "kept-reply"
    if behaviour == "honest":
        reply = fedlora_app.train(message, context)
        keep(reply.content, kept)
        return reply
    if behaviour == "replay":
        replica.record(get_catchup(message.content))
        return Message(kept_reply(kept), reply_to=message)
    replica.record(get_catchup(message.content))  # its replica stays true: only its replies lie
    shapes = {module: tuple(shape) for module, shape in plan["shapes"].items()}
    return Message(hostile_reply(behaviour, task, shapes), reply_to=message)


def keep(content: RecordDict, folder: Path) -> None:
    result, replica_round = decode_result(content)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(factors_to_tensors("", result.update.factors), folder / "factors.safetensors")
    (folder / "metrics.json").write_text(json.dumps({
        "num_examples": result.update.num_examples, "client_id": result.update.client_id,
        "train_loss": result.train_loss, "steps": result.steps, "seconds": result.seconds,
        "replica_round": replica_round}))


def kept_reply(folder: Path) -> RecordDict:
    """The kept reply, encoded again: the same bytes, so the same content digest."""
    saved = json.loads((folder / "metrics.json").read_text())
    factors = tensors_to_factors("", load_file(folder / "factors.safetensors"))
    update = ClientUpdate(factors, saved["num_examples"], saved["client_id"])
    return encode_result(ClientResult(update, saved["train_loss"], saved["steps"], saved["seconds"]),
                         replica_round=saved["replica_round"])


def made_up(task: ClientTask, shapes: dict[str, tuple[int, int]], rank: int) -> dict[str, LoraFactors]:
    generator = torch.Generator().manual_seed(task.data_seed % 2**63)
    return {module: LoraFactors(0.01 * torch.randn(rank, n, generator=generator),
                                0.01 * torch.randn(d, rank, generator=generator), task.alpha / task.plan.rank)
            for module, (d, n) in shapes.items()}


def hostile_reply(behaviour: str, task: ClientTask, shapes: dict[str, tuple[int, int]]) -> RecordDict:
    factors = made_up(task, shapes, 10 * task.plan.rank if behaviour == "rank-10x" else task.plan.rank)
    first = next(iter(factors))
    if behaviour == "nan":
        factors[first].A[0, 0] = float("nan")
    elif behaviour == "shape":
        f = factors[first]
        factors[first] = LoraFactors(torch.zeros(task.plan.rank, f.A.shape[1] + 1), f.B, f.scale)
    elif behaviour == "extra-arrays":
        d, n = shapes[first]
        factors[STRAY_MODULE] = LoraFactors(torch.zeros(task.plan.rank, n), torch.zeros(d, task.plan.rank), factors[first].scale)
    examples = 10**12 if behaviour == "examples-1e12" else 10
    content = encode_result(ClientResult(ClientUpdate(factors, examples, task.client_id), 1.0, task.local_steps, 0.1),
                            replica_round=task.server_round - 1)
    arrays = content.array_records[UPDATE_KEY]
    if behaviour == "float64":
        arrays[f"{first}.A"] = Array.from_numpy_ndarray(arrays[f"{first}.A"].numpy().astype(np.float64))
    elif behaviour == "missing-array":
        del arrays[f"{first}.B"]
    elif behaviour == "garbage":
        arrays[f"{first}.A"] = Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=b"\x93NUMPY\xff garbage")
    return content
