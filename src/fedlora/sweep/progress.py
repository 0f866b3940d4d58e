"""What a sweep reports while it works: a silent base class and one rich display for the whole
sweep, with an ETA measured from the runs finished so far."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from rich.console import Console

from fedlora.engine.rows import RoundRow
from fedlora.runtime.observer import RichObserver, RunObserver
from fedlora.sweep.outcomes import RunOutcome
from fedlora.sweep.plan import PlannedRun


class SweepObserver:
    """Callbacks of a sweep; the base class ignores them all (library use, tests)."""

    def sweep_started(self, total: int, pending: Sequence[str]) -> None:
        """``total`` runs will have run once the sweep is done; ``pending`` has the method of
        every one still to run."""

    def run_started(self, run: PlannedRun, resumed: bool) -> RunObserver:
        """The observer of the run's rounds."""
        return RunObserver()

    def run_finished(self, run: PlannedRun, outcome: RunOutcome, seconds: float, resumed: bool) -> None: ...

    def final_started(self, run: PlannedRun, what: str) -> None: ...

    def evaluation_progress(self, what: str, done: int, total: int) -> None: ...

    def log(self, message: str) -> None: ...


def remaining_seconds(done: Sequence[tuple[str, float]], pending: Sequence[str]) -> float | None:
    """Seconds the ``pending`` runs (their methods) should take, from the ``done`` ones
    ((method, seconds) each): a run costs the mean of the done runs of its method, or of all
    done runs while its method has none (the local baseline, say, costs several times FLoRA).
    None before any run is done."""
    if not done:
        return None
    overall = statistics.fmean(seconds for _, seconds in done)
    by_method: dict[str, list[float]] = {}
    for method, seconds in done:
        by_method.setdefault(method, []).append(seconds)
    return sum(statistics.fmean(by_method[m]) if m in by_method else overall for m in pending)


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _RoundsOfOneRun(RichObserver):
    """The rounds, clients and steps bars of the current run, without the per-round table."""

    def run_started(self, config, run_dir) -> None:
        self.progress.reset(self.rounds, total=config.rounds, description="round 0", note="")

    def round_started(self, server_round: int, tasks) -> None:
        super().round_started(server_round, tasks)
        self.progress.update(self.rounds, completed=server_round - 1)  # a resumed run starts past round 1

    def round_finished(self, row: RoundRow) -> None:
        self.progress.update(self.rounds, completed=row.round)
        self.progress.update(self.clients, visible=False)
        self.progress.update(self.steps, visible=False)
        loss = row.eval_loss
        self.progress.update(self.rounds, note="" if loss is None else f"test loss {loss:.4f}")


class RichSweepObserver(SweepObserver):
    """One display for the whole sweep: runs done of all, ETA, and the current run's rounds."""

    def __init__(self, console: Console):
        self.console = console
        self.run_display = _RoundsOfOneRun(console)
        self.progress = self.run_display.progress
        self.evaluation = self.progress.add_task("evaluation", total=None, note="", visible=False)
        self.sweep = self.progress.add_task("sweep", total=None, note="")
        self.done: list[tuple[str, float]] = []
        self.pending: list[str] = []  # the method of every run still to run
        self.logged: set[str] = set()

    def __enter__(self) -> RichSweepObserver:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def sweep_started(self, total: int, pending: Sequence[str]) -> None:
        self.pending = list(pending)
        self.progress.update(self.sweep, total=total, completed=total - len(self.pending),
                             note="ETA after the first run" if self.pending else "")

    def run_started(self, run: PlannedRun, resumed: bool) -> RunObserver:
        self.progress.update(self.sweep, description=f"sweep: {run.folder}" + (" (resumed)" if resumed else ""))
        return self.run_display

    def run_finished(self, run: PlannedRun, outcome: RunOutcome, seconds: float, resumed: bool) -> None:
        self.pending.remove(run.method)
        if not resumed:  # a resumed run's time covers only part of it
            self.done.append((run.method, seconds))
        remaining = remaining_seconds(self.done, self.pending)
        note = "" if not self.pending else (
            f"ETA {format_duration(remaining)} (from {len(self.done)} runs)" if remaining is not None else
            "ETA after the first whole run")
        self.progress.update(self.sweep, advance=1, note=note)
        test, val = outcome.final_test_loss, outcome.final_val_loss
        losses = ", ".join(f"{name} {value:.4f}" for name, value in (("test", test), ("val", val))
                           if value is not None)
        self.console.print(f"done {run.folder}: {losses} ({format_duration(seconds)})")

    def final_started(self, run: PlannedRun, what: str) -> None:
        self.progress.update(self.sweep, description=f"final {what}: {run.folder}")

    def evaluation_progress(self, what: str, done: int, total: int) -> None:
        self.progress.update(self.evaluation, description=what, completed=done, total=total, visible=done < total)

    def log(self, message: str) -> None:
        """Each message once: runs of one sweep repeat the same notes (truncated records, …)."""
        if message not in self.logged:
            self.logged.add(message)
            self.console.log(message)
