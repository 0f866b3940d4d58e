"""What a run reports while it works: the observer interface (a silent base class), several
observers as one, and the rich console display. Experiment trackers (fedlora.trackers) and user
code are observers too."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedlora.engine.config import RunConfig
from fedlora.engine.rows import RoundRow
from fedlora.engine.task import ClientResult, ClientTask
from fedlora.report import console_table, generation_lines

if TYPE_CHECKING:
    from fedlora.engine.run_folder import RunResult


class RunObserver:
    """Callbacks of a run; the base class ignores them all (library use, tests)."""

    def run_started(self, config: RunConfig, run_dir: Path) -> None: ...

    def round_started(self, server_round: int, tasks: list[ClientTask]) -> None: ...

    def client_started(self, task: ClientTask) -> None: ...

    def step_callback(self, task: ClientTask) -> Callable[[int, float], None] | None:
        return None

    def client_finished(self, result: ClientResult) -> None: ...

    def round_finished(self, row: RoundRow) -> None: ...

    def evaluation_progress(self, what: str, done: int, total: int) -> None:
        """A long measurement (MMLU, generation) has scored ``done`` of ``total``."""

    def log(self, message: str) -> None: ...

    def run_finished(self, result: RunResult) -> None: ...


class Observers(RunObserver):
    """Several observers as one: every event of :class:`RunObserver` goes to each, in order."""

    def __init__(self, observers: Sequence[RunObserver]):
        self.observers = list(observers)

    def step_callback(self, task: ClientTask) -> Callable[[int, float], None] | None:
        callbacks = [c for c in (observer.step_callback(task) for observer in self.observers) if c is not None]
        if not callbacks:
            return None

        def on_step(step: int, loss: float) -> None:
            for callback in callbacks:
                callback(step, loss)
        return on_step


def _to_each(event: str) -> Callable[..., None]:
    def forward(self: Observers, *args) -> None:
        for observer in self.observers:
            getattr(observer, event)(*args)
    forward.__name__ = event
    return forward


# every event but step_callback (which returns a callback) is handed on as it is, so one added
# to RunObserver reaches every observer without being written out here
for _event in [name for name in vars(RunObserver) if not name.startswith("_") and name != "step_callback"]:
    setattr(Observers, _event, _to_each(_event))


class RichObserver(RunObserver):
    """Progress bars for rounds, clients and steps, and the metrics table after every round."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(markup=False)  # messages hold paths and records, not markup
        self.rows: list[RoundRow] = []
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=self.console)
        self.rounds = self.progress.add_task("rounds", total=None, note="", visible=False)
        self.clients = self.progress.add_task("clients", total=None, note="", visible=False)
        self.steps = self.progress.add_task("steps", total=None, note="", visible=False)
        self.evaluation = self.progress.add_task("evaluation", total=None, note="", visible=False)

    def __enter__(self) -> RichObserver:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def run_started(self, config: RunConfig, run_dir: Path) -> None:
        self.progress.update(self.rounds, total=config.rounds, visible=True)

    def round_started(self, server_round: int, tasks: list[ClientTask]) -> None:
        self.progress.update(self.rounds, description=f"round {server_round}")
        self.progress.reset(self.clients, total=len(tasks), visible=True, note="")

    def client_started(self, task: ClientTask) -> None:
        self.progress.update(self.clients, description=f"client {task.client_id} (r={task.plan.rank})")
        self.progress.reset(self.steps, total=task.local_steps, visible=True, note="")

    def step_callback(self, task: ClientTask) -> Callable[[int, float], None]:
        def on_step(step: int, loss: float) -> None:
            self.progress.update(self.steps, completed=step, note=f"loss {loss:.3f}")
        return on_step

    def client_finished(self, result: ClientResult) -> None:
        self.progress.advance(self.clients)

    def round_finished(self, row: RoundRow) -> None:
        self.rows.append(row)
        if row.round > 0:
            self.progress.advance(self.rounds)
        self.progress.update(self.clients, visible=False)
        self.progress.update(self.steps, visible=False)
        self.console.print(console_table(self.rows[-1:] if len(self.rows) > 1 else self.rows,
                                         title=f"round {row.round}"))
        for line in generation_lines([row], width=max(40, self.console.width - 4)):
            self.console.print(f"  {line}")

    def evaluation_progress(self, what: str, done: int, total: int) -> None:
        self.progress.update(self.evaluation, description=what, completed=done, total=total, visible=done < total)

    def log(self, message: str) -> None:
        self.console.log(message)
