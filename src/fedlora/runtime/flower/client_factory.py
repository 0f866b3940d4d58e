"""What a ClientApp builds for one message: a trainer on a pristine base model, and its
examples or the run's evaluation.

A SuperNode, maybe on another machine, gets the run's configuration inside the Flower run
config, so it trains exactly as the in-process runtime would. This module imports only what a
client needs: no Federation, no plotting; evaluation only when a node is asked to evaluate.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from torch import nn

from fedlora.data import LazyTokenizedRecords, hold_out, load_records, split_clients
from fedlora.engine.client import LocalTrainer
from fedlora.engine.config import ConfigError, RunConfig, build_config
from fedlora.engine.inputs import load_client_records, load_run_model, resolve_data_paths, run_prompt_format
from fedlora.models import USER_CACHE, pad_token_id
from fedlora.runtime.flower.settings import AppSettings, NodeSettings


def _run_config(settings: AppSettings) -> RunConfig:
    return resolve_data_paths(build_config(json.loads(settings.run_config), source="Flower run config"),
                              log=lambda message: None)


def _trainer(config: RunConfig, node: NodeSettings) -> tuple[LocalTrainer, object]:
    """A trainer on the pristine base model, on the node's device, and the tokenizer."""
    model, tokenizer = load_run_model(config.replace(device=node.device or config.device),
                                      gguf_cache=node.model_cache or USER_CACHE)
    return LocalTrainer.from_config(model, pad_token_id(tokenizer), config), tokenizer


def client_factory(settings: AppSettings, node: NodeSettings) -> tuple[LocalTrainer, LazyTokenizedRecords]:
    """A trainer on a pristine base model and this node's training examples.

    ``node.data`` is the node's own records file; empty, the node takes partition
    ``node.partition_id`` of the run's data exactly as the server splits it. Either way the
    node holds out the validation records the server would (seeded by the partition id).
    """
    config = _run_config(settings)
    if node.data:
        records = load_records(node.data)
    elif config.data_on_nodes:
        raise ConfigError(f"partition {node.partition_id}: this run keeps the clients' records on the "
                          "SuperNodes; start this one with --node-config 'data=\"<its records file>\"'")
    else:
        clients = load_client_records(config)
        records = list(clients.values())[node.partition_id]
    records, _ = hold_out(records, config.validation_fraction, config.seed, node.partition_id)
    trainer, tokenizer = _trainer(config, node)
    return trainer, LazyTokenizedRecords(tokenizer, records, config.max_length,
                                         prompt_format=run_prompt_format(config, tokenizer))


def evaluation_factory(settings: AppSettings, node: NodeSettings) -> tuple[LocalTrainer, Callable[[nn.Module, int], dict]]:
    """A trainer on a pristine base model (the replica to evaluate on) and the run's evaluation,
    as the server's: its ``test_data`` and ``mmlu`` files must be readable on this node, and
    its ``data`` too for val_loss, on every client's validation records (with the data on the
    nodes there is no val_loss)."""
    from fedlora.engine.evaluator import evaluation_inputs, run_evaluator  # only for nodes asked to evaluate

    config = _run_config(settings)
    test_records, questions = evaluation_inputs(config)
    validation = [] if config.data_on_nodes else split_clients(load_client_records(config),
                                                                 config.validation_fraction, config.seed)[1]
    trainer, tokenizer = _trainer(config, node)
    return trainer, run_evaluator(config, tokenizer, trainer.pad_token_id, test_records, questions,
                                  prompt_format=run_prompt_format(config, tokenizer),
                                  validation_records=validation, packed=trainer.packing)
