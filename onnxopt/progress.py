"""Progress bars for long work, silent when the user asked for quiet or output is not a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


class Progress:
    """Hands out progress tasks; a disabled one costs nothing and prints nothing."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """Yield a function that advances the task by a number of steps."""
        if not self.enabled:
            yield lambda steps=1: None
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with RichProgress(*columns, console=self.console, transient=True) as bar:
            task_id = bar.add_task(description, total=total)
            yield lambda steps=1: bar.advance(task_id, steps)


QUIET = Progress(enabled=False)
