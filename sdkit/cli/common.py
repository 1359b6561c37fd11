"""Rendering helpers shared by the commands: sizes, key lists, progress bars."""

from __future__ import annotations

from typing import Callable, Sequence

import click
from rich.console import Console

SHOWN_KEYS = 3


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{size} B"


def key_examples(keys: Sequence[str]) -> str:
    """The first few keys of a list, and how many there are in all."""
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f", … ({len(keys)} keys)" if len(keys) > SHOWN_KEYS else "")


def is_quiet(ctx: click.Context | None = None) -> bool:
    """The group's --quiet flag."""
    ctx = ctx or click.get_current_context(silent=True)
    return bool(ctx and (ctx.find_root().obj or {}).get("quiet"))


class byte_progress:  # noqa: N801  (a context manager used like a function)
    """A byte progress bar with throughput on a terminal; yields None (no bar) otherwise.

    `with byte_progress(console, quiet, "merging") as advance:` — pass `advance` (or None)
    as the library call's progress callback, which reports bytes done per step.
    """

    def __init__(self, console: Console, quiet: bool, label: str, total: int | None = None) -> None:
        self.enabled = not quiet and console.is_terminal
        self.label = label
        self.total = total
        self.console = console

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled:
            return None
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        self.progress = Progress(TextColumn(self.label), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=self.total)
        return self._advance

    def _advance(self, count: int) -> None:
        self.progress.advance(self.task, count)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()
