"""Helpers shared by the commands: sizes, key lists, progress bars, a model's split parts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import click

if TYPE_CHECKING:  # rich is imported by the commands that draw, not by every command
    from rich.console import Console
    from rich.progress import ProgressColumn

SHOWN_KEYS = 3
BYTES = "bytes"


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


def quiet_peer_logs() -> None:
    """Silence transformers' notices about optional packages it misses (torchvision), which
    it prints when a pipeline module loads; diffusers' own warnings (a prompt cut at 77
    tokens) still show, unless --quiet. Commands skip this under --debug."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    if is_quiet():
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()


def is_quiet(ctx: click.Context | None = None) -> bool:
    """The group's --quiet flag."""
    ctx = ctx or click.get_current_context(silent=True)
    return bool(ctx and (ctx.find_root().obj or {}).get("quiet"))


class progress_bar:  # noqa: N801  (a context manager used like a function)
    """A progress bar on a terminal; yields None (no bar) otherwise.

    `with progress_bar(console, quiet, "merging") as advance:` — pass `advance` (or None)
    as the library call's progress callback, which reports how much was done per step:
    bytes by default (sizes, throughput, time left), else a count of `unit`.
    """

    def __init__(self, console: Console, quiet: bool, label: str, total: int | None = None,
                 unit: str = BYTES) -> None:
        self.enabled = not quiet and console.is_terminal
        self.label = label
        self.total = total
        self.unit = unit
        self.console = console

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled:
            return None
        from rich.progress import Progress

        self.progress = Progress(*self._columns(), console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=self.total)
        return self._advance

    def _columns(self) -> list[ProgressColumn]:
        from rich.progress import (BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        if self.unit == BYTES:
            return [TextColumn(self.label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn()]
        return [TextColumn(self.label), BarColumn(), TextColumn(f"{{task.completed}} {self.unit}")]

    def _advance(self, count: int) -> None:
        self.progress.advance(self.task, count)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()


def split_parts(model: str | Path, vae: str | Path | None, text_encoders: Sequence[str | Path],
                library: str | Path | None) -> tuple[Path | None, list[Path]]:
    """(VAE, text encoders) of `model`: those given, and those a diffusion model alone still
    lacks found in `library` (one line each names the file chosen)."""
    from sdkit.cli.terminal import echo
    from sdkit.hub.library.parts import choose_parts
    from sdkit.runtime.pipeline import FLOW_FAMILIES

    # the families whose loaders take split parts
    chosen = choose_parts(Path(model), Path(vae) if vae else None, [Path(p) for p in text_encoders],
                          Path(library) if library else None, FLOW_FAMILIES)
    if not is_quiet():
        for line in chosen.lines:
            echo(line, err=True)
    return chosen.vae, chosen.text_encoders
