"""A run folder's global model, restored from its newest checkpoint, for eval and export."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


from fedlora.aggregation import LoraFactors, get_aggregator
from fedlora.attention import enable_packing
from fedlora.engine.checkpoint import load_latest_checkpoint, with_prefix
from fedlora.engine.run_state import MethodPart
from fedlora.engine.config import CONFIG_FILE, ConfigError, RunConfig, build_config, load_saved_config
from fedlora.engine.evaluator import Progress, evaluation_inputs, run_evaluator
from fedlora.engine.global_model import GlobalModel
from fedlora.engine.inputs import Log, check_model_fits, load_run_model, resolve_data_paths, run_prompt_format
from fedlora.lora import low_rank_adapter, save_adapter
from fedlora.lora.merge import base_weight
from fedlora.engine.model_card import model_card
from fedlora.models import pad_token_id, published_name


@dataclass
class RestoredRun:
    run_dir: Path
    config: RunConfig
    global_model: GlobalModel
    tokenizer: object
    #: the global adapter the method evaluates on the base weights (FedIT and kin); None where
    #: updates were merged, or where the method keeps no global model (local training)
    adapter: dict[str, LoraFactors] | None
    completed_round: int

    @contextmanager
    def model(self):
        with self.global_model.with_adapter(self.adapter) as model:
            yield model


def restore_global_model(run_dir: Path) -> RestoredRun:
    config = load_saved_config(Path(run_dir) / CONFIG_FILE)
    loaded = load_latest_checkpoint(run_dir)
    if loaded is None:
        raise ConfigError(f"{run_dir}: no checkpoint yet; the run has not finished round 0")
    state, tensors = loaded
    modules = check_model_fits(config)
    model, tokenizer = load_run_model(config)
    global_model = GlobalModel(model, modules)
    global_model.load_state_dict((state["model"], with_prefix("model/", tensors)))
    method = get_aggregator(config.method, **config.method_options)
    method.setup(MethodPart.context(state["method"]))
    MethodPart(method).load_state_dict((state["method"], with_prefix("method/", tensors)))
    adapter = method.evaluation_adapters().get(None)
    return RestoredRun(Path(run_dir), config, global_model, tokenizer, adapter, state["completed_round"])


def evaluate_restored(restored: RestoredRun, overrides: dict, *, log: Log = lambda message: None,
                      progress: Progress | None = None) -> dict:
    """The run's evaluation of its latest global model (its configuration with ``overrides``),
    every measurement it has inputs for; the base weights are as loaded afterwards."""
    config = resolve_data_paths(build_config(overrides, source="command line", base=restored.config), log)
    test_records, questions = evaluation_inputs(config)
    packed = config.packing and enable_packing(restored.global_model.model)
    evaluator = run_evaluator(config, restored.tokenizer, pad_token_id(restored.tokenizer), test_records, questions,
                              prompt_format=run_prompt_format(config, restored.tokenizer), log=log,
                              progress=progress, packed=packed, final_round=restored.completed_round)
    if not evaluator.due(restored.completed_round):
        raise ConfigError("nothing to evaluate: give --test-data, --mmlu or --tasks")
    with restored.model() as model:
        return {"round": restored.completed_round, **evaluator(model, restored.completed_round)}


def export_merged(restored: RestoredRun, out_dir: Path) -> None:
    """A plain ``save_pretrained`` model with every update merged into its weights, and its card."""
    with restored.model() as model:
        model.save_pretrained(out_dir)
        restored.tokenizer.save_pretrained(out_dir)
    card = model_card(restored.run_dir, restored.config, restored.completed_round, kind="merged model")
    (Path(out_dir) / "README.md").write_text(card, encoding="utf-8")


def export_adapter(restored: RestoredRun, out_dir: Path, rank: int) -> float:
    """A rank-``rank`` PEFT adapter of (global model − original base) via SVD; returns the
    largest relative Frobenius error over modules."""
    original, _ = load_run_model(restored.config)
    modules = restored.global_model.adapted_modules
    factors, errors = {}, []
    with restored.model() as model:
        for name in modules:
            delta = base_weight(model, name).float() - base_weight(original, name).float()
            factors[name], error = low_rank_adapter(delta, rank)
            errors.append(error)
    save_adapter(original, factors, rank, float(rank), restored.config.target_modules, out_dir,
                 base_name=published_name(restored.config.model))
    usage = (f"Load with PEFT on its base: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\""
             f"{published_name(restored.config.model)}\"), \"<this folder>\")`. It is the best rank-{rank} "
             f"approximation of the run's whole accumulated update (relative Frobenius error {max(errors):.3e}).")
    card = model_card(restored.run_dir, restored.config, restored.completed_round,
                      kind=f"LoRA adapter, rank {rank}", extra=usage)
    (Path(out_dir) / "README.md").write_text(card, encoding="utf-8")
    return max(errors)
