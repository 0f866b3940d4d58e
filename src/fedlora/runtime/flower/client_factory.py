"""What a ClientApp builds for one message: a trainer on a pristine base model and its examples.

A SuperNode, maybe on another machine, gets the run's configuration inside the Flower run
config, so it trains exactly as the in-process runtime would. This module imports only what a
client needs: no Federation, no evaluation, no plotting.
"""

from __future__ import annotations

import json

from fedlora.data import LazyTokenizedRecords, hold_out, load_records
from fedlora.engine.client import LocalTrainer
from fedlora.engine.config import ConfigError, build_config
from fedlora.engine.inputs import load_client_records, load_run_model, resolve_data_paths
from fedlora.models import pad_token_id
from fedlora.runtime.flower.codec import AppSettings, NodeSettings


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
        raise ConfigError(f"partition {node.partition_id}: this run keeps the clients' records on the "
                          "SuperNodes; start this one with --node-config 'data=\"<its records file>\"'")
    else:
        clients = load_client_records(config)
        records = list(clients.values())[node.partition_id]
    records, _ = hold_out(records, config.validation_fraction, config.seed, node.partition_id)
    model, tokenizer = load_run_model(config, gguf_cache=node.model_cache or None)
    trainer = LocalTrainer.from_config(model, pad_token_id(tokenizer), config)
    return trainer, LazyTokenizedRecords(tokenizer, records, config.max_length)
