"""Helpers the test modules share (no tests here): client data on disk, tiny runs, a byte
tokenizer, Flower's serialisation and an in-memory Flower grid. Test modules import from here, never from each other."""

from __future__ import annotations

import json
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fedlora.engine.config import RunConfig, build_config, save_config
from fedlora.engine.metrics import read_metrics
from fedlora.engine.setup import prepare_run
from fedlora.runtime.flower import client_app, runner
from fedlora.runtime.inprocess import run_inprocess

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DOLLY = SHARED_DATA / "dolly-10clients"
MMLU = SHARED_DATA / "mmlu" / "mmlu_test_1444.json"

CATEGORIES = ("open_qa", "summarization", "brainstorming", "alpaca")


def make_records(client: int, count: int) -> list[dict]:
    return [{"instruction": f"Question {i} from client {client}: name a colour.",
             "context": "" if i % 3 else f"Context {i}",
             "response": f"Answer {i}: {'red green blue'.split()[(i + client) % 3]}.",
             "category": CATEGORIES[(i + client) % len(CATEGORIES)]} for i in range(count)]


def write_clients(folder: Path, sizes=(8, 12, 20), test_records: int = 6) -> Path:
    """Clients of the given sizes plus a test file, Dolly format, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for client, count in enumerate(sizes):
        (folder / f"local_training_{client}.json").write_text(json.dumps(make_records(client, count)))
    (folder / "global_test.json").write_text(json.dumps(make_records(9, test_records)))
    return folder


def require_shared_data() -> None:
    if not DOLLY.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")


EVAL_KEYS = ("round", "eval_loss", "perplexity", "train_loss", "bytes_up", "bytes_down", "clients",
             "mmlu_acc")


def tiny_config(client_dir: Path, out: Path, **overrides) -> RunConfig:
    # float32 on every device: the tests built on it check float32 exactness (bfloat16: test_bf16_run.py)
    values = {"model": "tiny-llama", "dtype": "float32", "data": str(client_dir), "rounds": 2, "local_steps": 2,
              "batch_size": 2, "max_length": 48, "ranks": [4, 2, 1], "out": str(out), "lr": 1e-2,
              "generation_limit": 2, "max_new_tokens": 8,
              # validation every round: a run resumed with more rounds then has the rows of one that had them all
              "val_every": 1}
    values.update(overrides)
    return build_config(values)


def run_tiny(client_dir: Path, out: Path, **overrides) -> list[dict]:
    config = tiny_config(client_dir, out, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    run_inprocess(prepare_run(config, out, log=lambda message: None))
    return read_metrics(out)


def flower_run(client_dir: Path, run_dir: Path, on_started=None, **overrides) -> dict:
    """A tiny run on Flower's Deployment Engine, in this process; ``on_started`` in a thread beside it."""
    config = tiny_config(client_dir, run_dir, runtime="flower", **overrides)
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / "config.json")
    if on_started is not None:
        threading.Thread(target=on_started, daemon=True).start()
    return runner.run_flower(config, run_dir)


def no_process_of(run_dir: Path) -> bool:
    """Whether no process left behind names ``run_dir`` on its command line."""
    return subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True).stdout == b""


def without_times(rows: list[dict]) -> list[dict]:
    """Metric rows without their wall-clock times."""
    return [{key: value for key, value in row.items() if not key.endswith("seconds")} for row in rows]


def comparable(rows: list[dict]) -> list[dict]:
    """The deterministic part of metric rows (wall-clock times excluded)."""
    return [{key: row.get(key) for key in EVAL_KEYS} for row in rows]


def write(path: Path, content: object) -> Path:
    """Write JSON (or raw text/bytes as given) to ``path`` and return it."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content), encoding="utf-8")
    return path


def byte_tokenizer(*, bos: bool = True) -> PreTrainedTokenizerFast:
    """Every UTF-8 byte one token, plus <pad>=0, <s>=1, </s>=2: nothing to download."""
    specials = ["<pad>", "<s>", "</s>"]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                               special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def over_the_wire(content):
    """``content`` serialised to bytes and rebuilt, as Flower does between processes."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objects = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(content).items()}
    return inflate_object_from_contents(content.object_id, objects)


def over_the_wire_message(message: Message) -> Message:
    copy = over_the_wire(message)
    copy.metadata.__dict__["_message_id"] = message.object_id
    return copy


class InMemoryGrid(Grid):
    """Delivers each message to the ClientApp of its node, through Flower's serialisation;
    nodes in ``dead`` never answer, as a crashed SuperNode."""

    def __init__(self, nodes: dict[int, dict], run_config: dict):
        self.nodes = nodes
        self.run_config = run_config
        self.dead: set[int] = set()
        self.sent: list[Message] = []
        self.replies: dict[str, Message] = {}

    def set_run(self, run) -> None: ...

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            ids.append(message.object_id)
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if node in self.dead:
                continue
            received = over_the_wire_message(message)
            context = Context(run_id=1, node_id=node, node_config=self.nodes[node], state=RecordDict(),
                              run_config=self.run_config)
            try:
                reply = client_app.app(received, context)
            except Exception as error:  # the SuperNode turns a ClientApp exception into an error reply
                reply = Message(Error(code=0, reason=str(error)), reply_to=received)
            self.replies[message.object_id] = over_the_wire_message(reply)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError("the strategy pushes and pulls itself")


def run_on_in_memory_flower(config: RunConfig, nodes_dir: Path) -> tuple[dict, dict]:
    """``config`` (runtime flower) run by fedlora's real ServerApp loop, ClientApp and factories
    over an :class:`InMemoryGrid`, one node per client with its state under ``nodes_dir``: (the
    Federation's summary, the report of the transport). Real SuperLink and SuperNode processes
    cost a minute a run here."""
    from fedlora.runtime.flower import runner
    from fedlora.runtime.flower.server_app import serve

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    settings = replace(runner.app_settings(config, out), round_timeout=60.0, connect_timeout=0.0)
    federation, report = serve(in_memory_grid(config, nodes_dir), settings)
    return federation.summary(), report


def in_memory_grid(config: RunConfig, nodes_dir: Path) -> InMemoryGrid:
    """An :class:`InMemoryGrid` with one node per client of ``config``, its state under ``nodes_dir``."""
    from fedlora.runtime.flower import runner

    nodes = {1000 + node.partition_id: {"partition-id": node.partition_id, "data": node.data,
                                        "state-dir": str(nodes_dir / str(node.partition_id))}
             for node in runner.node_settings(config)}
    return InMemoryGrid(nodes, runner.app_settings(config, Path(config.out)).to_run_config())
