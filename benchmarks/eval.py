"""Evaluation benchmark: what evaluating costs, and whether fedlora's numbers mean what lm-eval's mean.

(a) MMLU, all 1,444 questions of FLoRA's file on SmolLM2-135M, in the Alpaca prompt (part ``mmlu``)
    and in its chat template (``mmlu_chat``, a SmolLM2 run's default): fedlora's own scoring (the
    letter's log-likelihood after the prompt, packed batches; what the ``mmlu`` key runs) and
    lm-evaluation-harness's ``fedlora_mmlu`` task (the same prompt, lm-eval's multiple-choice
    log-likelihoods), one after the other on the same in-memory model: each accuracy with its
    Wilson interval, how many questions both answer alike, both times and their ratio;
(b) generation: greedy answers (KV cache, batches of 8 left-padded, up to 64 new tokens, stopping
    at EOS) to the first 32 held-out Dolly prompts in the chat format a run renders them in:
    tokens generated per second, ROUGE-L;
(c) the demo: ``fedlora run configs/demo.toml`` as ``make demo`` runs it: its wall time, the share
    of it spent evaluating (the rows' ``eval_seconds`` over the run's wall time), and what it shows.

Every part runs in its own subprocess with every core, as ``fedlora eval`` and ``fedlora run`` do.
Run from the repository root: ``make bench-eval``. Writes benchmarks/results/eval.md (and
eval_summary.md, README's lines) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import DEMO_CONFIG, DOLLY_TEST, RESULTS, environment_line, markdown_table, measure_in_subprocess, \
    peak_rss_mb, require_shared_data, run_cli, timed, timed_mmlu_scoring, write_result

MODEL = "smollm2-135m"
BATCH = 8
GENERATION_PROMPTS, GENERATION_TOKENS, GENERATION_PROMPT_LENGTH = 32, 64, 512
#: a default run evaluates for at most this share of its time; the demo runs in at most this long
EVAL_SHARE_GOAL, DEMO_GOAL_SECONDS = 0.20, 120.0
PARTS = ("mmlu", "mmlu_chat", "generation", "demo")
#: the prompt format each MMLU part scores in: the Alpaca prompt, and SmolLM2-Instruct's chat template (a run's default)
MMLU_FORMATS = {"mmlu": "alpaca", "mmlu_chat": "chat"}


def mmlu_by_format(results: dict) -> dict[str, dict]:
    """Prompt format → the MMLU part measured in it, for the parts this run or the one before measured."""
    return {MMLU_FORMATS[part]: results[part] for part in MMLU_FORMATS if part in results}


def part_mmlu(prompt_format: str) -> dict:
    from fedlora.data.mmlu import LETTERS
    from fedlora.eval.harness import run_tasks

    model, tokenizer, questions, packing, fast = timed_mmlu_scoring(MODEL, BATCH, prompt_format)
    harness = timed(lambda: run_tasks(model, tokenizer, ["fedlora_mmlu"], questions=questions, batch_size=BATCH,
                                      prompt_format=prompt_format, samples=True))
    fast_choices = [LETTERS[i] for i in fast.pop("value").argmax(dim=-1).tolist()]
    results = harness.pop("value")
    harness_choices = {}
    for sample in results["samples"]["fedlora_mmlu"]:
        likelihoods = [response[0] for response in sample["filtered_resps"]]
        harness_choices[sample["doc_id"]] = LETTERS[max(range(len(LETTERS)), key=likelihoods.__getitem__)]
    answers = [question.answer for question in questions]
    return {"questions": len(questions), "packing": packing, "fast": fast, "harness": harness,
            "fast_correct": sum(c == a for c, a in zip(fast_choices, answers)),
            "harness_correct": sum(harness_choices[i] == a for i, a in enumerate(answers)),
            "harness_acc": results["fedlora_mmlu"]["acc"],
            "same_choices": sum(harness_choices[i] == c for i, c in enumerate(fast_choices)),
            "peak_rss_mb": peak_rss_mb()}


def part_generation() -> dict:
    from fedlora.data import generation_prompts, load_records, resolve_prompt_format
    from fedlora.eval.generation import evaluate_generation
    from fedlora.models import load_model

    model, tokenizer = load_model(MODEL)
    prompt_format = resolve_prompt_format(None, tokenizer)
    prompts, _ = generation_prompts(tokenizer, load_records(DOLLY_TEST), GENERATION_PROMPT_LENGTH,
                                    GENERATION_PROMPTS, prompt_format=prompt_format)
    evaluate_generation(model, tokenizer, prompts[:BATCH], max_new_tokens=4, batch_size=BATCH)  # warm-up
    measured = timed(lambda: evaluate_generation(model, tokenizer, prompts, max_new_tokens=GENERATION_TOKENS,
                                                 batch_size=BATCH))
    metrics = measured.pop("value")
    return {"prompts": len(prompts), "prompt_format": prompt_format, "prompt_tokens": sum(len(p.prompt_ids)
                                                                                         for p in prompts),
            **measured, "generated_tokens": metrics["generated_tokens"], "rouge_l": metrics["rouge_l"],
            "exact_match": metrics["exact_match"], "peak_rss_mb": peak_rss_mb()}


def part_demo() -> dict:
    from fedlora.engine.metrics import read_metrics, read_summary

    with tempfile.TemporaryDirectory(prefix="fedlora-bench-eval-") as folder:
        out = Path(folder) / "demo"
        seconds = run_cli(["run", str(DEMO_CONFIG), "--out", str(out)])
        rows, summary = read_metrics(out), read_summary(out)
    return {"seconds": seconds, "run_seconds": summary["wall_seconds"],
            "eval_seconds": sum(row["eval_seconds"] for row in rows),
            "rows": [{key: row.get(key) for key in ("round", "eval_loss", "rouge_l", "exact_match", "generation_n",
                                                    "eval_seconds", "seconds", "sample_generation")}
                     for row in rows]}


# --- report ---------------------------------------------------------------------------------------


def accuracy(correct: int, total: int) -> str:
    from fedlora.stats import accuracy_text

    return accuracy_text(correct / total, total)


def report(results: dict, load: float, seconds: float, measured: list[str]) -> str:
    kept = [part for part in PARTS if part in results and part not in measured]
    lines = ["# Evaluation benchmark", "",
             f"Command: `make bench-eval` · {environment_line(os.cpu_count() or 1, load)} · "
             f"{seconds / 60:.1f} min in all" + (f" for {', '.join(measured)}; {', '.join(kept)} from the run "
                                                 "before (`--parts`)." if kept else "."), ""]
    mmlu = mmlu_by_format(results)
    if mmlu:
        first = next(iter(mmlu.values()))
        total = first["questions"]
        rows = [[prompt_format, scorer, accuracy(r[correct], total), f"{r[key]['wall']:.1f}"]
                for prompt_format, r in mmlu.items() for scorer, correct, key in (
                    ("fedlora (the `mmlu` key; the default)", "fast_correct", "fast"),
                    ("lm-evaluation-harness (`eval_tasks = [\"fedlora_mmlu\"]`)", "harness_correct", "harness"))]
        lines += ["## (a) MMLU: fedlora's scoring and lm-evaluation-harness", "",
                  f"{MODEL}, all {total} questions of `mmlu_test_1444.json`, {BATCH} per batch, in each prompt "
                  "format a run may use: the zero-shot Alpaca prompt (`fedlora.data.mmlu.mmlu_prompt`) and the "
                  "model's chat template (the question as the user's turn, the letter the first token of the "
                  "assistant's answer); lm-eval's task `fedlora_mmlu` is given the same prompts. fedlora scores the "
                  "letter as the next token in "
                  f"{'packed' if first['packing'] else 'padded'} batches; lm-eval scores each of the four "
                  "continuations by its log-likelihood. Accuracy with its 95 % Wilson interval; "
                  "wall seconds of one pass each, lm-eval's including its task set-up.", "",
                  *markdown_table(["prompt format", "scorer", "accuracy", "wall s"], rows), "",
                  *[f"- {prompt_format}: the same answer for {r['same_choices']} of {total} "
                    f"questions; fedlora's time ÷ lm-eval's: {r['fast']['wall'] / r['harness']['wall']:.2f}. "
                    f"Peak RSS {r['peak_rss_mb']:.0f} MB." for prompt_format, r in mmlu.items()], ""]
    if "generation" in results:
        r = results["generation"]
        lines += ["## (b) Generation", "",
                  f"{MODEL}, greedy answers to the first {r['prompts']} held-out Dolly test prompts that fit "
                  f"{GENERATION_PROMPT_LENGTH} tokens, in the {r['prompt_format']} format "
                  f"({r['prompt_tokens']} prompt tokens in all), batches of {BATCH} left-padded, KV cache, at most "
                  f"{GENERATION_TOKENS} new tokens each, stopping at EOS.", "",
                  *markdown_table(["tokens generated", "wall s", "tokens / s", "ROUGE-L", "exact match"], [[
                      r["generated_tokens"], f"{r['wall']:.1f}", f"{r['generated_tokens'] / r['wall']:.1f}",
                      f"{r['rouge_l']:.4f}", accuracy(round(r["exact_match"] * r["prompts"]), r["prompts"])]]), ""]
    if "demo" in results:
        r = results["demo"]
        share = r["eval_seconds"] / r["run_seconds"]
        first, last = r["rows"][0], r["rows"][-1]
        sample = first["sample_generation"] or {}
        lines += ["## (c) The demo", "",
                  f"`fedlora run {DEMO_CONFIG}` (what `make demo` runs after installing), once: "
                  f"{r['seconds']:.0f} s from the command to its exit (goal ≤ {DEMO_GOAL_SECONDS:.0f} s); "
                  f"of the run's {r['run_seconds']:.0f} s, {r['eval_seconds']:.1f} s evaluating: "
                  f"**{100 * share:.1f} %** (goal ≤ {100 * EVAL_SHARE_GOAL:.0f} %).", "",
                  *markdown_table(["round", "held-out loss", "ROUGE-L", "eval s", "round s"], [[
                      row["round"], f"{row['eval_loss']:.4f}",
                      "—" if row["rouge_l"] is None else f"{row['rouge_l']:.4f}", f"{row['eval_seconds']:.1f}",
                      f"{row['seconds']:.1f}"] for row in r["rows"]]), "",
                  f"- Held-out loss {first['eval_loss']:.4f} → {last['eval_loss']:.4f}; ROUGE-L "
                  f"{first['rouge_l']:.4f} → {last['rouge_l']:.4f} on {last['generation_n']} prompts "
                  "(one run: this says what the demo shows, not that one method is better).",
                  f"- Prompt: {sample.get('prompt', '—')!r}",
                  f"- Answer before training: {sample.get('answer', '—')!r}",
                  f"- Answer after: {(last['sample_generation'] or {}).get('answer', '—')!r}", ""]
    return "\n".join(lines)


def summary(results: dict) -> str:
    """README's lines: the demo's cost, MMLU's agreement with lm-eval, generation's speed."""
    lines = ["# Evaluation", ""]
    if "demo" in results:
        r = results["demo"]
        share = 100 * r["eval_seconds"] / r["run_seconds"]
        lines.append(f"- `make demo` runs in {r['seconds']:.0f} s after install, {share:.1f} % of it evaluating "
                     "(held-out loss every round, ROUGE-L of 8 generated answers before and after).")
    if mmlu := mmlu_by_format(results):
        agreement = "; ".join(f"{r['same_choices']} of {r['questions']} in the {prompt_format} format "
                              f"({r['fast']['wall'] / r['harness']['wall']:.2f}× lm-eval's time)"
                              for prompt_format, r in mmlu.items())
        lines.append(f"- MMLU (1,444 questions, SmolLM2-135M): fedlora's scoring and lm-evaluation-harness choose the "
                     f"same answer for {agreement}.")
    if "generation" in results:
        r = results["generation"]
        lines.append(f"- Greedy generation: {r['generated_tokens'] / r['wall']:.0f} tokens/s on this CPU.")
    return "\n".join(lines + ["", "Details: [benchmarks](docs/benchmarks.md#evaluation-benchmark)."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS, help="one measurement, as JSON (internal)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated (default all: {','.join(PARTS)}); the others keep their last results")
    args = parser.parse_args()
    if args.part:
        part = (lambda: part_mmlu(MMLU_FORMATS[args.part])) if args.part in MMLU_FORMATS else \
            {"generation": part_generation, "demo": part_demo}[args.part]
        print(json.dumps(part()))
        return
    require_shared_data()
    started, load = time.perf_counter(), os.getloadavg()[0]
    measured = [p for p in PARTS if p in args.parts.split(",")]
    previous = RESULTS / "eval.json"
    results = json.loads(previous.read_text(encoding="utf-8")) if previous.is_file() else {}
    for part in measured:
        print(f"[eval] {part}", file=sys.stderr, flush=True)
        results[part] = measure_in_subprocess(__file__, ["--part", part])
    write_result("eval.json", json.dumps(results, indent=2) + "\n")
    text = report(results, load, time.perf_counter() - started, measured)
    write_result("eval.md", text)
    write_result("eval_summary.md", summary(results))
    print(text)


if __name__ == "__main__":
    main()
