"""What a runtime reports while it works: a silent base class and a rich console display."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedlora.engine.rows import RoundRow
from fedlora.engine.task import ClientResult, ClientTask
from fedlora.report import console_table


class RunObserver:
    """Callbacks of a run; the base class ignores them all (library use, tests)."""

    def round_started(self, server_round: int, tasks: list[ClientTask]) -> None: ...

    def client_started(self, task: ClientTask) -> None: ...

    def step_callback(self, task: ClientTask) -> Callable[[int, float], None] | None:
        return None

    def client_finished(self, result: ClientResult) -> None: ...

    def round_finished(self, row: RoundRow) -> None: ...

    def log(self, message: str) -> None: ...


class RichObserver(RunObserver):
    """Progress bars for rounds, clients and steps, and the metrics table after every round."""

    def __init__(self, num_rounds: int, console: Console | None = None):
        self.console = console or Console(markup=False)  # messages hold paths and records, not markup
        self.rows: list[RoundRow] = []
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=self.console)
        self.rounds = self.progress.add_task("rounds", total=num_rounds, note="")
        self.clients = self.progress.add_task("clients", total=None, note="", visible=False)
        self.steps = self.progress.add_task("steps", total=None, note="", visible=False)

    def __enter__(self) -> RichObserver:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

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

    def log(self, message: str) -> None:
        self.console.log(message)
