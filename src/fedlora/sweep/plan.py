"""A sweep file and the runs it stands for.

A sweep file is TOML::

    base = "configs/demo.toml"   # optional: a run configuration file (paths as `fedlora run` reads them)
    [run]                        # RunConfig keys shared by every run, over the base
    rounds = 3
    [grid]                       # every combination of these RunConfig keys
    seed = [0, 1, 2]
    lr = [3e-4, 1e-3, 3e-3]
    [tune]
    keys = ["lr"]                # chosen per (setting, method) on the mean final val_loss over seeds
    test = "chosen"              # the last round's test loss only of the chosen runs (default "all")
    [settings.homogeneous]       # RunConfig keys of this setting, and its methods
    ranks = [16]
    methods = ["flora", "fedit"]
    [compare]
    reference = "flora"          # the method every other is compared with (default flora)
    [final]                      # scored once on each chosen run's final model, after tuning
    mmlu = "../shared/data/mmlu/mmlu_test_1444.json"
    mmlu_questions = 300         # a fixed seeded sample of the file; all of it when absent
    seeds = [0]                  # only the chosen runs of these seeds; all when absent

Without settings there is one, ``default``, whose methods are the grid's ``method`` axis or
the run's ``method``. Every run is an ordinary run folder ``SETTING/METHOD/KEY=VALUE,…``.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.engine.config import ConfigError, RunConfig, build_config, load_config, read_toml, with_absolute_paths

SECTIONS = ("base", "run", "grid", "tune", "settings", "compare", "final")
SEED = "seed"
DEFAULT_SETTING = "default"
DEFAULT_REFERENCE = "flora"
#: RunConfig keys a sweep decides itself
RESERVED = ("out",)


@dataclass(frozen=True)
class PlannedRun:
    setting: str
    method: str
    #: this run's value of every grid axis
    point: dict[str, Any]
    #: the run folder, relative to the sweep's output folder
    folder: str
    #: its configuration; ``out`` is set when the sweep's output folder is known
    config: RunConfig


@dataclass(frozen=True)
class FinalMMLU:
    """MMLU questions scored once per chosen run, after tuning."""

    path: str
    questions: int | None  # a seeded sample of this many; None: the whole file
    seeds: tuple[int, ...] | None = None  # the chosen runs of these seeds; None: of every seed
    sample_seed: int = 0

    def scores(self, run: PlannedRun) -> bool:
        return self.seeds is None or run.config.seed in self.seeds

    def select(self, questions: list) -> list:
        """The fixed sample (in file order; the file is sorted by subject, so its head is not one)."""
        if self.questions is None or self.questions >= len(questions):
            return questions
        chosen = sorted(random.Random(self.sample_seed).sample(range(len(questions)), self.questions))
        return [questions[index] for index in chosen]

    def question_set(self) -> dict:
        """What fixes the questions: a score made with the same ones is not made again."""
        return {"mmlu": self.path, "questions": self.questions, "sample_seed": self.sample_seed}

    def to_json(self) -> dict:
        return {**self.question_set(), "seeds": self.seeds and list(self.seeds)}


@dataclass(frozen=True)
class SweepPlan:
    source: str
    #: grid axis → its values, in file order
    grid: dict[str, list]
    tune: tuple[str, ...]
    #: setting → its methods
    settings: dict[str, tuple[str, ...]]
    reference: str
    final: FinalMMLU | None
    runs: list[PlannedRun]
    #: score the test set after round 0 only on the chosen runs, once their group is tuned
    #: (``[tune] test = "chosen"``); every run scores round 0, the untrained model, shared
    test_chosen_only: bool = False

    def to_json(self) -> dict:
        """What `fedlora compare` needs to know of the plan (written to the sweep folder)."""
        return {"source": self.source, "grid": self.grid, "tune": list(self.tune),
                "settings": {name: list(methods) for name, methods in self.settings.items()},
                "reference": self.reference, "final": self.final.to_json() if self.final else None,
                "test_chosen_only": self.test_chosen_only,
                "runs": [{"folder": run.folder, "setting": run.setting, "method": run.method, "point": run.point}
                         for run in self.runs]}


def load_sweep(path: str | Path) -> SweepPlan:
    """Read and check a sweep file; every run's configuration is validated, nothing is loaded."""
    path = Path(path)
    return plan_sweep(read_toml(path, "sweep file"), str(path))


def plan_sweep(document: dict, source: str) -> SweepPlan:
    """The plan of a parsed sweep file; ``source`` names the file in every error."""
    def fail(where: str, message: str) -> ConfigError:
        return ConfigError(f"{source}: {where} {message}")

    unknown = set(document) - set(SECTIONS)
    if unknown:
        raise fail(repr(sorted(unknown)[0]), f"is not a sweep section; use {', '.join(SECTIONS)}")
    shared = _table(document, "run", fail)
    grid = {key: _axis(key, values, fail) for key, values in _table(document, "grid", fail).items()}
    for key in RESERVED:
        if key in shared or key in grid:
            raise fail(repr(key), "is chosen by the sweep (its --out folder); remove it")
    if not isinstance(document.get("base", ""), str):
        raise fail("'base'", "must be the path of a run configuration file")
    base = load_config(document["base"]) if "base" in document else RunConfig()
    base = build_config(shared, source=f"{source}: [run]", base=base)
    settings, setting_values = _settings(_table(document, "settings", fail), grid, base, fail)
    tune, test_chosen_only = _tune(_table(document, "tune", fail), grid, fail)
    reference = _reference(_table(document, "compare", fail), settings, fail)
    final = _final(_table(document, "final", fail), fail)

    runs = []
    for setting, methods in settings.items():
        for method in methods:
            for values in itertools.product(*grid.values()):
                point = dict(zip(grid, values))
                folder = "/".join((setting, method, point_name(point)))
                config = build_config({**setting_values[setting], "method": method, **point},
                                      source=f"{source}: {folder}", base=base)
                if config.runtime != "inprocess":
                    raise fail(folder, "must run in process ('runtime' inprocess): a sweep shares one loaded model")
                if tune and config.validation_fraction == 0:
                    raise fail(folder, "has 'validation_fraction' 0, but tuning needs val_loss")
                runs.append(PlannedRun(setting, method, point, folder, with_absolute_paths(config)))
    folders = [run.folder for run in runs]
    if len(set(folders)) != len(folders):
        raise fail("[grid]", "has values that name the same run folder; make them distinct")
    return SweepPlan(source, grid, tune, settings, reference, final, runs, test_chosen_only)


def _settings(table: dict, grid: dict[str, list], base: RunConfig,
              fail) -> tuple[dict[str, tuple[str, ...]], dict[str, dict]]:
    """(setting → its methods, setting → its RunConfig keys); without settings, ``default``
    with the grid's ``method`` axis (taken out of the grid) or the run's method."""
    if not table:
        return {DEFAULT_SETTING: tuple(grid.pop("method", [base.method]))}, {DEFAULT_SETTING: {}}
    if "method" in grid:
        raise fail("[grid] 'method'", "cannot be an axis when settings list their methods")
    methods_of, values_of = {}, {}
    for name, setting in table.items():
        if not isinstance(setting, dict) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise fail(f"settings.{name}", "must be a table named with letters, digits, '.', '_' or '-'")
        values = dict(setting)
        methods = values.pop("methods", None)
        if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
            raise fail(f"settings.{name}.methods", "must be a non-empty list of method names")
        clash = sorted(set(values) & (set(grid) | {"method", *RESERVED}))
        if clash:
            raise fail(f"settings.{name}.{clash[0]}", "is also a grid axis or chosen otherwise; set it in one place")
        methods_of[name], values_of[name] = _unique(methods, f"settings.{name}.methods", fail), values
    return methods_of, values_of


def _tune(table: dict, grid: dict[str, list], fail) -> tuple[tuple[str, ...], bool]:
    """(the tuned keys, whether only the chosen runs score the test set after round 0)."""
    keys = table.get("keys", [])
    if set(table) - {"keys", "test"} or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise fail("[tune]", "takes 'keys', a list of grid axes, and optionally 'test'")
    for key in keys:
        if key not in grid or key in (SEED, "method"):
            raise fail(f"[tune] {key!r}", "must be a grid axis other than seed and method")
    test = table.get("test", "all")
    if test not in ("all", "chosen"):
        raise fail("[tune] 'test'", f"must be \"all\" (every run scores the test set) or \"chosen\", got {test!r}")
    if test == "chosen" and not keys:
        raise fail("[tune] 'test'", "is \"chosen\", but no keys are tuned: every run is chosen")
    return _unique(keys, "[tune] keys", fail), test == "chosen"


def _reference(table: dict, settings: dict[str, tuple[str, ...]], fail) -> str:
    """The method compared with (default flora, which a sweep need not hold)."""
    if set(table) - {"reference"}:
        raise fail("[compare]", "takes only 'reference'")
    reference = table.get("reference", DEFAULT_REFERENCE)
    if not isinstance(reference, str) or ("reference" in table
                                          and not any(reference in methods for methods in settings.values())):
        raise fail("[compare] 'reference'", f"must be a method of some setting, got {reference!r}")
    return reference


def point_name(point: dict[str, Any]) -> str:
    """The folder name of a grid point: ``lr=0.001,seed=0`` (``run`` without a grid)."""
    if not point:
        return "run"
    return ",".join(f"{key}={_value_name(value)}" for key, value in sorted(point.items()))


def _value_name(value: Any) -> str:
    if isinstance(value, list):
        return "-".join(_value_name(item) for item in value)
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def _table(document: dict, name: str, fail) -> dict:
    value = document.get(name, {})
    if not isinstance(value, dict):
        raise fail(f"[{name}]", "must be a table")
    return value


def _axis(key: str, values: Any, fail) -> list:
    if not isinstance(values, list) or not values:
        raise fail(f"[grid] {key!r}", "must be a non-empty list of values")
    return list(_unique(values, f"[grid] {key!r}", fail))


def _unique(values: list, where: str, fail) -> tuple:
    repeated = [value for index, value in enumerate(values) if value in values[:index]]
    if repeated:
        raise fail(where, f"lists {repeated[0]!r} twice")
    return tuple(values)


def _final(table: dict, fail) -> FinalMMLU | None:
    if not table:
        return None
    if set(table) - {"mmlu", "mmlu_questions", "seeds"} or not isinstance(table.get("mmlu"), str):
        raise fail("[final]", "takes 'mmlu' (a questions file) and optionally 'mmlu_questions' and 'seeds'")
    questions = table.get("mmlu_questions")
    if questions is not None and not _positive_int(questions):
        raise fail("[final] 'mmlu_questions'", f"must be an integer ≥ 1, got {questions!r}")
    seeds = table.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise fail("[final] 'seeds'", f"must be a non-empty list of seeds, got {seeds!r}")
    mmlu = Path(table["mmlu"])
    if not mmlu.is_file():
        raise fail("[final] 'mmlu'", f"names no file: {mmlu}")
    return FinalMMLU(str(mmlu.resolve()), questions, tuple(seeds) if seeds else None)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
