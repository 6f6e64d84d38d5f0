"""The one shape of every progress display: description, bar, the caller's counters, elapsed
time and time left, on stderr so that stdout stays free for results (JSON, a piped stream)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

__all__ = ["MofNCompleteColumn", "RemainingColumn", "TextColumn", "progress_bar"]


class RemainingColumn(ProgressColumn):
    """Time left, or how to stop when the work has no end (a task whose total is None)."""

    def __init__(self, endless: str = "Ctrl-C to stop") -> None:
        super().__init__()
        self.endless = endless

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text(self.endless, style="progress.remaining")
        remaining = task.time_remaining
        if remaining is None:
            return Text("ETA --:--", style="progress.remaining")
        minutes, secs = divmod(int(remaining), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"ETA {hours:d}:{minutes:02d}:{secs:02d}", style="progress.remaining")


def progress_bar(
    *counters: ProgressColumn,
    console: Console | None = None,
    enabled: bool = True,
    spinner: bool = False,
    remaining: bool = True,
    endless: str = "Ctrl-C to stop",
    transient: bool = False,
    refresh_per_second: float = 10,
) -> Progress:
    """A Rich progress display: `counters` (default "done/total") sit between the bar and the
    times. `enabled=False` shows nothing (quiet runs, ranks other than 0). A lower
    `refresh_per_second` keeps the display thread light where the CPU is being timed."""
    columns: list[ProgressColumn] = [SpinnerColumn()] if spinner else []
    columns += [TextColumn("[bold]{task.description}"), BarColumn()]
    columns += list(counters) or [MofNCompleteColumn()]
    columns.append(TimeElapsedColumn())
    if remaining:
        columns.append(RemainingColumn(endless))
    return Progress(
        *columns,
        console=console or Console(stderr=True),
        disable=not enabled,
        transient=transient,
        refresh_per_second=refresh_per_second,
    )
