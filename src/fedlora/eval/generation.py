"""Generation quality: greedy answers to held-out prompts, scored against the references.

The prompts are batched with left padding and decoded greedily by transformers' ``generate``
(KV cache, up to ``max_new_tokens``, each answer stopping at EOS); ROUGE-L (``rouge-score``,
the F-measure, with stemming) and exact match (after whitespace and case are normalised) are
averaged over the records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedlora.data.prompts import GenerationPrompt
from fedlora.forward import eval_mode
from fedlora.models import model_device, pad_token_id


def left_padded(prompts: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of prompts padded on the left, so that every answer starts at the same column."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def generate(model: nn.Module, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 8,
             progress: Callable[[int], None] | None = None) -> tuple[list[str], int]:
    """Greedy answers to ``prompts`` (token ids; the text each continues with up to its EOS,
    special tokens dropped), and the number of tokens generated in all (each EOS included)."""
    answers: list[str] = []
    generated = 0
    pad_id, device = pad_token_id(tokenizer), model_device(model)
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = {key: value.to(device) for key, value in left_padded(prompts[start:start + batch_size],
                                                                          pad_id).items()}
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                    eos_token_id=tokenizer.eos_token_id)
            continuation = output[:, batch["input_ids"].shape[1]:].cpu()
            for row in continuation.tolist():
                # the answer is what comes before EOS (it and the padding after it are generated, not said)
                said = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
                generated += min(said + 1, len(row))
                answers.append(tokenizer.decode(row[:said], skip_special_tokens=True).strip())
            if progress is not None:
                progress(len(answers))
    return answers, generated


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure of each prediction against its reference (``rouge-score``)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(reference, prediction)["rougeL"].fmeasure
              for prediction, reference in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores) if scores else float("nan")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The share of predictions equal to their reference, whitespace and case normalised."""
    def normal(text: str) -> str:
        return " ".join(text.lower().split())
    matches = [normal(p) == normal(r) for p, r in zip(predictions, references, strict=True)]
    return sum(matches) / len(matches) if matches else float("nan")


def evaluate_generation(model: nn.Module, tokenizer, prompts: Sequence[GenerationPrompt], *, max_new_tokens: int,
                        batch_size: int = 8, progress: Callable[[int], None] | None = None) -> dict:
    """``{"rouge_l", "exact_match", "generation_n", "generated_tokens", "sample_generation"}``:
    the mean scores over ``prompts``, how many, the tokens generated, and the first prompt with
    its reference and answer (``{"prompt", "reference", "answer"}``, to read)."""
    answers, tokens = generate(model, tokenizer, [p.prompt_ids for p in prompts], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress=progress)
    references = [p.reference for p in prompts]
    sample = None if not prompts else {"prompt": tokenizer.decode(prompts[0].prompt_ids, skip_special_tokens=True),
                                       "reference": references[0], "answer": answers[0]}
    return {"rouge_l": rouge_l(answers, references), "exact_match": exact_match(answers, references),
            "generation_n": len(prompts), "generated_tokens": tokens, "sample_generation": sample}
