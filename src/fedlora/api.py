"""fedlora from Python: run a federation, resume one, read a finished one.

    import fedlora
    result = fedlora.run("configs/demo.toml", out="runs/demo", rounds=2)
    result.rows[-1].eval_loss, result.summary["communication"], result.paths.report

``run`` takes a :class:`~fedlora.engine.config.RunConfig`, a dict of its keys or a TOML path,
with keyword overrides; observers (:class:`~fedlora.runtime.observer.RunObserver`) get every
run and round event, as the console display and the experiment trackers (``report_to``) do.
The command line, the sweeps and the benchmarks run through :func:`execute`, so the sequence
configuration → run folder → rounds → summary → report exists once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.engine.config import CONFIG_FILE, ConfigError, RunConfig, build_config, load_config, \
    load_saved_config, save_config, with_absolute_paths
from fedlora.engine.metrics import write_summary
from fedlora.engine.run_folder import RunPaths, RunResult, load_run
from fedlora.files import folder_lock
from fedlora.runtime.observer import Observers, RunObserver

if TYPE_CHECKING:
    from fedlora.trackers import TrackerGroup

__all__ = ["run", "resume", "load_run", "execute", "RunResult", "RunPaths", "resolve_config"]

ConfigLike = RunConfig | Mapping[str, Any] | str | Path | None


def resolve_config(config: ConfigLike, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """A checked RunConfig from a RunConfig, a dict of its keys or a TOML file, with ``overrides``."""
    if isinstance(config, (str, Path)) or config is None:
        return load_config(config, dict(overrides or {}))
    values = config.to_dict() if isinstance(config, RunConfig) else dict(config)
    return build_config({**values, **(overrides or {})}, source="fedlora.run")


def run(config: ConfigLike = None, *, out: str | Path | None = None, observers: Sequence[RunObserver] = (),
        **overrides: Any) -> RunResult:
    """Run a federation into a new run folder (``out``, else the configuration's ``out``) and
    return what it wrote. Refuses a folder that already holds a run (continue it with
    :func:`resume`) and one another process is writing."""
    if out is not None:
        overrides["out"] = str(out)
    run_config = with_absolute_paths(resolve_config(config, overrides))
    run_dir = Path(run_config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(run_dir):
        if (run_dir / CONFIG_FILE).exists():
            raise ConfigError(f"{run_dir} already holds a run; continue it with `fedlora run --resume {run_dir}` "
                              "(fedlora.resume) or choose another out folder")
        save_config(run_config, run_dir / CONFIG_FILE)  # before any work, so even round 0 can resume
        return execute(run_config, run_dir, observers)


def resume(run_dir: str | Path, *, rounds: int | None = None, observers: Sequence[RunObserver] = ()) -> RunResult:
    """Continue the run in ``run_dir`` from its newest checkpoint, to ``rounds`` if given (its
    saved configuration otherwise; only the number of rounds may change)."""
    run_dir = Path(run_dir)
    with folder_lock(run_dir):
        config = load_saved_config(run_dir / CONFIG_FILE)
        if rounds is not None:
            config = build_config({**config.to_dict(), "rounds": rounds}, source=f"{run_dir}: --rounds")
            save_config(config, run_dir / CONFIG_FILE)
        return execute(config, run_dir, observers)


def execute(config: RunConfig, run_dir: Path, observers: Sequence[RunObserver] = (), *,
            loaded: tuple | None = None, evaluation: Callable | None = None,
            tracker_group: TrackerGroup | None = None) -> RunResult:
    """Run (or continue) ``config`` in its prepared ``run_dir`` on the configured runtime, with
    ``observers`` and the configuration's experiment trackers; then summary.json (with this
    invocation's ``wall_seconds``) and the report.

    ``loaded`` and ``evaluation`` are for callers running many federations on one model (a
    sweep: see :func:`fedlora.engine.setup.prepare_run`); ``tracker_group`` groups the trackers'
    runs (a sweep's).
    """
    from fedlora.report import write_report
    from fedlora.trackers import trackers_for

    started = time.perf_counter()
    observer = Observers([*observers, *trackers_for(config, run_dir, group=tracker_group)])
    observer.run_started(config, run_dir)
    if config.runtime == "flower":
        from fedlora.runtime.flower.runner import run_flower

        summary = run_flower(config, run_dir, observer)
    else:
        from fedlora.engine.setup import prepare_run
        from fedlora.runtime.inprocess import run_inprocess

        runtime = {"loaded": loaded} | ({"evaluation": evaluation} if evaluation is not None else {})
        summary = run_inprocess(prepare_run(config, run_dir, log=observer.log, progress=observer.evaluation_progress,
                                            **runtime), observer)
    write_summary(run_dir, {**summary, "wall_seconds": time.perf_counter() - started})
    write_report(run_dir)
    result = load_run(run_dir)
    observer.run_finished(result)
    return result
