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
    seeds = [0, 1]               # tuning reads these seeds' runs; the others run at the chosen values only
    [method_grid.centralized]    # a method's own values of grid axes (here: lower learning rates)
    lr = [1e-4, 3e-4, 1e-3]
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.engine.config import ConfigError, RunConfig, build_config, load_config, read_toml, with_absolute_paths

SECTIONS = ("base", "run", "grid", "method_grid", "tune", "settings", "compare", "final")
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
class TuningRule:
    """How a sweep tunes: which grid axes, over which grid per method, read from which seeds."""

    #: the tuned grid axes (typically ``lr``); empty: nothing is tuned, every run is chosen
    keys: tuple[str, ...]
    #: the sweep's grid
    grid: dict[str, list]
    #: a method's own values of some axes (``[method_grid.centralized]``), replacing the grid's
    method_grids: dict[str, dict[str, list]]
    #: the seeds whose runs tuning reads; the other seeds run only at the chosen values (None: all)
    seeds: tuple[int, ...] | None = None

    def grid_of(self, method: str) -> dict[str, list]:
        return {**self.grid, **self.method_grids.get(method, {})}

    def tunes_on(self, run: PlannedRun) -> bool:
        """Whether the choice reads ``run``: every run of a tuned seed (or of any seed, without
        ``seeds``); the runs of the other seeds run only where their values are chosen."""
        return not self.keys or self.seeds is None or run.point.get(SEED) in self.seeds

    def expected_runs(self, runs: Sequence[PlannedRun]) -> int:
        """How many of one group's planned ``runs`` will run: those tuning reads, plus one per
        other seed (at the chosen values)."""
        tuning = [run for run in runs if self.tunes_on(run)]
        return len(tuning) + len({run.point.get(SEED) for run in runs if not self.tunes_on(run)})


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
    #: the tuned axes, per-method grids and tuning seeds
    tuning: TuningRule
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
        return {"source": self.source, "grid": self.grid, "tune": list(self.tuning.keys),
                "method_grids": self.tuning.method_grids,
                "tune_seeds": list(self.tuning.seeds) if self.tuning.seeds is not None else None,
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
    tune, tune_seeds, test_chosen_only = _tune(_table(document, "tune", fail), grid, fail)
    method_grids = _method_grids(_table(document, "method_grid", fail), grid, settings, fail)
    tuning = TuningRule(tune, grid, method_grids, tune_seeds)
    reference = _reference(_table(document, "compare", fail), settings, fail)
    final = _final(_table(document, "final", fail), fail)

    runs = []
    for setting, methods in settings.items():
        for method in methods:
            method_grid = tuning.grid_of(method)
            for values in itertools.product(*method_grid.values()):
                point = dict(zip(method_grid, values))
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
    return SweepPlan(source, grid, tuning, settings, reference, final, runs, test_chosen_only)


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


def _tune(table: dict, grid: dict[str, list], fail) -> tuple[tuple[str, ...], tuple[int, ...] | None, bool]:
    """(the tuned keys, the seeds tuning reads (None: all), whether only the chosen runs score
    the test set after round 0)."""
    keys = table.get("keys", [])
    if set(table) - {"keys", "test", "seeds"} or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise fail("[tune]", "takes 'keys', a list of grid axes, and optionally 'test' and 'seeds'")
    for key in keys:
        if key not in grid or key in (SEED, "method"):
            raise fail(f"[tune] {key!r}", "must be a grid axis other than seed and method")
    test = table.get("test", "all")
    if test not in ("all", "chosen"):
        raise fail("[tune] 'test'", f"must be \"all\" (every run scores the test set) or \"chosen\", got {test!r}")
    if test == "chosen" and not keys:
        raise fail("[tune] 'test'", "is \"chosen\", but no keys are tuned: every run is chosen")
    seeds = table.get("seeds")
    if seeds is not None:
        if not keys:
            raise fail("[tune] 'seeds'", "needs tuned 'keys'")
        if (not isinstance(seeds, list) or not seeds
                or any(seed not in grid.get(SEED, []) or isinstance(seed, bool) for seed in seeds)):
            raise fail("[tune] 'seeds'", f"must be a non-empty list of the grid's seeds {grid.get(SEED, [])}, "
                                         f"got {seeds!r}")
        seeds = _unique(seeds, "[tune] seeds", fail)
    return _unique(keys, "[tune] keys", fail), seeds, test == "chosen"


def _method_grids(table: dict, grid: dict[str, list], settings: dict[str, tuple[str, ...]],
                  fail) -> dict[str, dict[str, list]]:
    """method → its own values of some grid axes (``[method_grid.<method>]``)."""
    methods = {method for listed in settings.values() for method in listed}
    grids = {}
    for method, axes in table.items():
        if method not in methods or not isinstance(axes, dict):
            raise fail(f"[method_grid.{method}]", "must be a table of grid axes for a method of some setting")
        for key, values in axes.items():
            if key not in grid or key in (SEED, "method"):
                raise fail(f"[method_grid.{method}] {key!r}", "must be a grid axis other than seed and method")
        grids[method] = {key: _axis(key, values, fail) for key, values in axes.items()}
    return grids


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
