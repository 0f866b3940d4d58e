"""A run folder's global model, restored from its newest checkpoint, for eval and export."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fedlora.aggregation import LoraFactors, get_aggregator
from fedlora.attention import enable_packing
from fedlora.engine.checkpoint import load_latest_checkpoint, with_prefix
from fedlora.engine.run_state import MethodPart
from fedlora.engine.config import CONFIG_FILE, ConfigError, RunConfig, build_config, load_saved_config
from fedlora.engine.evaluator import Progress, evaluation_inputs, run_evaluator
from fedlora.engine.global_model import GlobalModel
from fedlora.engine.inputs import Log, check_model_fits, load_run_model, resolve_data_paths, run_prompt_format
from fedlora.lora import low_rank_adapter, merge_factors, save_adapter
from fedlora.lora.merge import merged_delta
from fedlora.lora.residual import full_precision
from fedlora.engine.model_card import model_card
from fedlora.models import pad_token_id, published_name
from fedlora.quantization import Quantization


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

    def full_precision_model(self) -> nn.Module:
        """The global model in plain full-precision weights, for export: the adapter merged for
        good and, on a quantised base, every quantised linear dequantised with its residual
        added. The restored run is spent afterwards."""
        merge_factors(self.global_model.model, self.adapter or {}, carry={})
        return full_precision(self.global_model.model)


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
    """A plain ``save_pretrained`` model with every update merged into its weights (a quantised
    base dequantised in full precision, its residuals added), and its card."""
    model = restored.full_precision_model()
    model.save_pretrained(out_dir)
    restored.tokenizer.save_pretrained(out_dir)
    quantization = restored.config.quantization
    kind = "merged model" + (f", dequantised from {quantization}" if quantization else "")
    card = model_card(restored.run_dir, restored.config, restored.completed_round, kind=kind)
    (Path(out_dir) / "README.md").write_text(card, encoding="utf-8")


def export_adapter(restored: RestoredRun, out_dir: Path, rank: int) -> float:
    """A rank-``rank`` PEFT adapter of the run's accumulated update (global model − original
    base, or on a quantised base its residuals) via SVD; returns the largest relative Frobenius
    error over modules. On a quantised base it is saved for, and loads onto, that same base."""
    original, _ = load_run_model(restored.config)
    modules = restored.global_model.adapted_modules
    factors, errors = {}, []
    with restored.model() as model:
        for name in modules:
            factors[name], error = low_rank_adapter(merged_delta(model, original, name), rank)
            errors.append(error)
    save_adapter(original, factors, rank, float(rank), restored.config.target_modules, out_dir,
                 base_name=published_name(restored.config.model))
    quantization = Quantization.from_config(restored.config)
    base = f"AutoModelForCausalLM.from_pretrained(\"{published_name(restored.config.model)}\"" + (
        f", quantization_config={quantization.loading_code(original.dtype)})" if quantization else ")")
    usage = (f"Load with PEFT on its {'quantised ' if quantization else ''}base: `PeftModel.from_pretrained({base}, "
             f"\"<this folder>\")`. It is the best rank-{rank} approximation of the run's whole accumulated update "
             f"(relative Frobenius error {max(errors):.3e}).")
    card = model_card(restored.run_dir, restored.config, restored.completed_round,
                      kind=f"LoRA adapter, rank {rank}", extra=usage)
    (Path(out_dir) / "README.md").write_text(card, encoding="utf-8")
    return max(errors)
