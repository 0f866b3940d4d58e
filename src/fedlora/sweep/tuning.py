"""Choosing the tuned keys (typically ``lr``) of every (setting, method) on validation loss.

The choice is made from the final ``val_loss`` of each run alone, averaged over seeds; the
functions here are given nothing else, so the test set cannot sway it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedlora.engine.config import ConfigError
from fedlora.sweep.plan import SEED, TuningRule, point_name


class SweptRun(Protocol):
    """A run of a sweep as tuning sees it (a PlannedRun, or one read back from the sweep folder)."""

    setting: str
    method: str
    point: dict[str, Any]
    folder: str


@dataclass(frozen=True)
class Group:
    """The runs one comparison row stands on: a variant of a setting and one method."""

    #: the setting, plus any grid axis that is neither a seed nor tuned (``homogeneous · local_steps=5``)
    variant: str
    method: str


def variant_of(run: SweptRun, tune: Sequence[str]) -> str:
    fixed = {key: value for key, value in run.point.items() if key != SEED and key not in tune}
    return run.setting if not fixed else f"{run.setting} · {point_name(fixed)}"


def groups(runs: Sequence[SweptRun], tune: Sequence[str]) -> dict[Group, list[SweptRun]]:
    """The runs by group, in the order given."""
    grouped: dict[Group, list[SweptRun]] = {}
    for run in runs:
        grouped.setdefault(Group(variant_of(run, tune), run.method), []).append(run)
    return grouped


@dataclass(frozen=True)
class Candidate:
    """One combination of tuned values and its final validation losses, one per seed."""

    values: dict[str, Any]
    val_losses: tuple[float, ...]

    @property
    def mean(self) -> float:
        """Mean final validation loss; a diverged run (NaN) makes its candidate the worst."""
        mean = statistics.fmean(self.val_losses)
        return math.inf if math.isnan(mean) else mean


@dataclass(frozen=True)
class Choice:
    chosen: dict[str, Any]
    #: every combination of tuned values, in grid order (empty without tuned keys)
    candidates: list[Candidate]
    #: tuned keys whose chosen value is the smallest or largest of its grid: the best may lie outside
    at_edge: list[str]
    #: the group's runs at the chosen values, one per seed
    runs: list[SweptRun]


def choose(runs: Sequence[SweptRun], final_val_loss: Mapping[str, float | None], rule: TuningRule) -> Choice:
    """The tuned values of one group with the lowest mean final validation loss over the seeds
    tuning reads, and the group's runs at those values (of every seed).

    ``final_val_loss`` maps the folder of every run tuning reads to its final val_loss: the
    only measurement the choice sees. Ties go to the earlier value in the grid. Without tuned
    keys every run is chosen.
    """
    tune = rule.keys
    if not tune:
        return Choice({}, [], [], list(runs))
    grid = rule.grid_of(runs[0].method)
    by_values: dict[tuple, list[float]] = {}
    for run in filter(rule.tunes_on, runs):
        loss = final_val_loss[run.folder]
        if loss is None:
            raise ConfigError(f"{run.folder}: no val_loss to tune {', '.join(tune)} on "
                              "(was 'validation_fraction' 0?)")
        by_values.setdefault(tuple(run.point[key] for key in tune), []).append(loss)
    grid_order = sorted(by_values, key=lambda values: [grid[key].index(v) for key, v in zip(tune, values)])
    candidates = [Candidate(dict(zip(tune, values)), tuple(by_values[values])) for values in grid_order]
    best = min(candidates, key=lambda candidate: candidate.mean)
    at_edge = [key for key in tune if len(grid[key]) > 1 and _numeric(grid[key])
               and best.values[key] in (min(grid[key]), max(grid[key]))]
    chosen = [run for run in runs if all(run.point[key] == value for key, value in best.values.items())]
    return Choice(best.values, candidates, at_edge, chosen)


def _numeric(values: list) -> bool:
    return all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values)
