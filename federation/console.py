"""The command line's consoles and progress bars, shared by every ``privrad`` sub-command."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn

__all__ = ["console", "out_console", "progress_bar"]

console = Console(stderr=True)
"""Progress and logs (standard error)."""

out_console = Console()
"""Results: tables and summaries (standard output)."""


def progress_bar(field: str | None = None, *, transient: bool = False) -> Progress:
    """Description, bar, done/total, the task's ``field`` (when given: each task must set it), elapsed time."""
    columns: list[ProgressColumn | str] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if field is not None:
        columns.append(TextColumn(f"{{task.fields[{field}]}}"))
    columns.append(TimeElapsedColumn())
    return Progress(*columns, console=console, transient=transient)
