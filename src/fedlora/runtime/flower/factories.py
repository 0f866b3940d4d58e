"""The real engine behind the Flower apps: what the ServerApp and ClientApp build from a run folder.

The ServerApp reads the run's saved ``config.json``; a SuperNode, maybe on another machine,
gets the same configuration inside the Flower run config. So a SuperNode trains exactly as
the in-process runtime would, and the ServerApp's Federation is the in-process one.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.data import LazyTokenizedRecords, hold_out, load_records
from fedlora.engine.client import LocalTrainer
from fedlora.engine.config import build_config, load_saved_config
from fedlora.engine.federation import Federation
from fedlora.engine.setup import load_client_records, load_run_model, prepare_run, resolve_data_paths
from fedlora.eval.loss import pad_token_id
from fedlora.runtime.flower.codec import AppSettings, NodeSettings

CONFIG_FILE = "config.json"


def federation_factory(run_dir: Path) -> Federation:
    """The server's Federation; it keeps the log of base merges that replicas catch up from."""
    return prepare_run(load_saved_config(Path(run_dir) / CONFIG_FILE), Path(run_dir),
                       keep_base_log=True).federation


def client_factory(settings: AppSettings, node: NodeSettings) -> tuple[LocalTrainer, LazyTokenizedRecords]:
    """A trainer on a pristine base model and this node's training examples.

    ``node.data`` is the node's own records file; empty, the node takes partition
    ``node.partition_id`` of the run's data exactly as the server splits it. Either way the
    node holds out the validation records the server would (seeded by the partition id).
    """
    config = resolve_data_paths(build_config(json.loads(settings.run_config), source="Flower run config"),
                                log=lambda message: None)
    if node.data:
        records = load_records(node.data)
    elif config.data_on_nodes:
        raise ValueError(f"partition {node.partition_id}: this run keeps the clients' records on the "
                         "SuperNodes; start this one with --node-config 'data=\"<its records file>\"'")
    else:
        clients = load_client_records(config)
        records = list(clients.values())[node.partition_id]
    records, _ = hold_out(records, config.validation_fraction, config.seed, node.partition_id)
    model, tokenizer = load_run_model(config, gguf_cache=node.model_cache or None)
    trainer = LocalTrainer.from_config(model, pad_token_id(tokenizer), config)
    return trainer, LazyTokenizedRecords(tokenizer, records, config.max_length)
