"""lm-evaluation-harness as the evaluation engine for tasks, on the model in memory.

:func:`run_tasks` scores a model (the caller merges the global adapter and restores the base
weights afterwards) on lm-eval tasks by name, through ``lm_eval.simple_evaluate`` with an
``HFLM`` wrapping the model and its tokenizer: no reload, no Hub. fedlora ships offline task
definitions (``tasks/``): ``fedlora_mmlu``, FLoRA's MMLU file with fedlora's own prompt, and
``fedlora_generation``, greedy answers to held-out records scored by ROUGE-L and exact match;
any task lm-eval knows runs too where its data is available offline, and one whose data is not
is a one-line :class:`TaskDataMissing`. lm-eval is imported only here, lazily.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from fedlora.data.mmlu import LETTERS, MMLUQuestion
from fedlora.eval.mmlu import LETTER_DELIMITERS, encode_context, mmlu_context
from fedlora.errors import FedloraError
from fedlora.models import context_length
from fedlora.data.prompts import GenerationPrompt

TASKS_DIR = Path(__file__).with_name("tasks")
#: the tasks fedlora defines (tasks/<name>.yaml, whose DATA_FILE, MAX_NEW_TOKENS and
#: LETTER_DELIMITER it fills in when it writes their documents)
FEDLORA_TASKS = ("fedlora_mmlu", "fedlora_generation")


class TaskDataMissing(FedloraError):
    """An lm-eval task whose data cannot be had offline; names the task and what to do."""


@contextmanager
def offline() -> Iterator[None]:
    """The Hub and datasets offline while lm-eval runs, so that missing data fails at once."""
    import datasets

    saved = {key: os.environ.get(key) for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    was = datasets.config.HF_HUB_OFFLINE
    os.environ.update(dict.fromkeys(saved, "1"))
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = was
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def quiet() -> Iterator[None]:
    """lm-eval's own log at errors only while it runs: its notes on an in-memory model are expected here."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _task_rows(task: str, questions: Sequence[MMLUQuestion], prompts: Sequence[GenerationPrompt], tokenizer,
               prompt_format: str) -> list[dict]:
    """The documents of one of fedlora's tasks, each prompt as fedlora renders it (special tokens
    written out, so that lm-eval, which adds none, tokenises it to the same ids)."""
    if task == "fedlora_mmlu":
        if not questions:
            raise TaskDataMissing("lm-eval task 'fedlora_mmlu' needs MMLU questions: give the run an 'mmlu' file")
        return [{"prompt": tokenizer.decode(encode_context(tokenizer, mmlu_context(tokenizer, q, prompt_format),
                                                           prompt_format)),
                 "answer": LETTERS.index(q.answer)} for q in questions]
    if not prompts:
        raise TaskDataMissing("lm-eval task 'fedlora_generation' needs held-out records: give the run 'test_data'")
    return [{"prompt": tokenizer.decode(p.prompt_ids), "reference": p.reference} for p in prompts]


def _write_tasks(folder: Path, data_folder: Path, tasks: Sequence[str], questions: Sequence[MMLUQuestion],
                 prompts: Sequence[GenerationPrompt], tokenizer, max_new_tokens: int, prompt_format: str) -> None:
    """fedlora's task definitions asked for, in ``folder``, their data in ``data_folder``."""
    for task in set(tasks) & set(FEDLORA_TASKS):
        data = data_folder / f"{task}.jsonl"
        _write_jsonl(data, _task_rows(task, questions, prompts, tokenizer, prompt_format))
        filled = {"DATA_FILE": str(data), "MAX_NEW_TOKENS": str(max_new_tokens),
                  "LETTER_DELIMITER": LETTER_DELIMITERS[prompt_format]}
        definition = (TASKS_DIR / f"{task}.yaml").read_text(encoding="utf-8")
        for placeholder, value in filled.items():
            definition = definition.replace(placeholder, value)
        (folder / f"{task}.yaml").write_text(definition, encoding="utf-8")


@functools.cache
def _task_manager():
    """lm-eval's index of every task it knows (some 15,000: 6 s to build) and of fedlora's, once
    per process, with the folder holding fedlora's definitions. The index keeps paths only and
    lm-eval reads a task's YAML when it loads it, so :func:`run_tasks` rewrites them in place
    (one at a time: fedlora evaluates one model at a time)."""
    from lm_eval.tasks import TaskManager

    folder = Path(tempfile.mkdtemp(prefix="fedlora-lm-eval-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    shutil.copyfile(TASKS_DIR / "utils.py", folder / "utils.py")
    for task in FEDLORA_TASKS:  # indexed as templates: their placeholders are filled before each run
        shutil.copyfile(TASKS_DIR / f"{task}.yaml", folder / f"{task}.yaml")
    return TaskManager(include_path=str(folder)), folder


def run_tasks(model: nn.Module, tokenizer, tasks: Sequence[str], *, questions: Sequence[MMLUQuestion] = (),
              prompts: Sequence[GenerationPrompt] = (), prompt_format: str = "alpaca", batch_size: int = 8,
              max_new_tokens: int = 64,
              limit: int | None = None, samples: bool = False) -> dict[str, Any]:
    """``{task: {metric: value, "n": documents}}`` of lm-eval's run of ``tasks`` on ``model``
    (each metric's standard error as ``<metric>_stderr``); with ``samples`` also ``"samples"``:
    lm-eval's per-document records, by task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    # each run's documents in a folder of their own, removed after it: no run reads another's
    with tempfile.TemporaryDirectory(prefix="fedlora-lm-eval-data-") as data_folder, offline(), quiet():
        manager, folder = _task_manager()
        _write_tasks(folder, Path(data_folder), tasks, questions, prompts, tokenizer, max_new_tokens, prompt_format)
        unknown = [task for task in tasks if task not in manager.all_tasks]
        if unknown:
            raise TaskDataMissing(f"lm-eval knows no task {unknown[0]!r} (fedlora's own: {', '.join(FEDLORA_TASKS)})")
        # the context fedlora's own MMLU scoring cuts prompts to, so both score the same tokens
        context = context_length(model)
        language_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                              **({"max_length": context} if context else {}))
        try:
            results = simple_evaluate(model=language_model, tasks=list(tasks), task_manager=manager, limit=limit,
                                      log_samples=samples)
        except (ConnectionError, OSError, ValueError) as error:
            if "offline" not in str(error).lower() and "connect" not in str(error).lower():
                raise
            raise TaskDataMissing(f"lm-eval task {', '.join(tasks)}: its data is not available offline "
                                  f"({type(error).__name__}); download it once where the Hub is reachable "
                                  "(its datasets land in the Hugging Face cache), or write it as a local "
                                  "JSON task (see fedlora/eval/tasks/)") from None
    metrics: dict[str, Any] = {}
    for task, values in results["results"].items():
        # lm-eval names a metric "<metric>,<filter>"; fedlora's tasks and most others have one filter
        scores = {key.split(",")[0]: float(value) for key, value in values.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)}
        documents = results.get("n-samples", {}).get(task)  # a group of tasks has none of its own
        metrics[task] = {**scores, **({"n": documents["effective"]} if documents else {})}
    if samples:
        metrics["samples"] = results["samples"]
    return metrics
