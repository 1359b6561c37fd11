"""SIGKILL at random points of a merge, a LoRA bake and a conversion.

A killed process cleans nothing up, so a hidden temporary file
(`.<name>.<host>-<pid>.<random>.partial`) may stay behind; what must never happen is a
file under the output name, or any change to an input. A re-run with those leftovers
present writes the same tensors as an undisturbed run and removes them.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from faults_cli import WRITING_COMMANDS, CliServer, Run
from safetensors.torch import load_file

KILLS_PER_COMMAND = 4
POLL_SECONDS = 0.0005


@dataclass
class Timeline:
    """What an undisturbed run looks like: when a temporary file first appears, and the
    size of the output."""

    first_temporary: float
    output_size: int


def _belongs(name: str, output: Path) -> bool:
    return name.startswith(f".{output.name}.")


def temporaries(folder: Path, output: Path, earlier: frozenset[str] = frozenset()) -> dict[str, int]:
    """Hidden files beside `output` that belong to it, with their sizes (those named in
    `earlier`, left by previous runs, aside)."""
    found = {}
    for entry in os.scandir(folder):
        if _belongs(entry.name, output) and entry.name not in earlier:
            try:
                found[entry.name] = entry.stat().st_size
            except FileNotFoundError:
                pass  # renamed away between listing and stat
    return found


def watch(run: Run, folder: Path, output: Path, stop: Callable[[float, int], bool]) -> None:
    """Poll until `stop(seconds since start, largest size of a temporary file of this
    run)` or the run ends."""
    started = time.perf_counter()
    earlier = frozenset(os.listdir(folder))
    while run.poll() is None:
        sizes = temporaries(folder, output, earlier).values()
        if stop(time.perf_counter() - started, max(sizes, default=-1)):
            return
        time.sleep(POLL_SECONDS)


def undisturbed(cli: CliServer, argv: list[str], folder: Path, output: Path) -> Timeline:
    run = cli.start(*argv)
    appeared: list[float] = []

    def note(elapsed: float, size: int) -> bool:
        if size >= 0 and not appeared:
            appeared.append(elapsed)
        return False

    watch(run, folder, output, note)
    result = run.wait()
    assert result.status == 0, result.stderr
    assert appeared, "no temporary file was ever seen: the write is too fast to interrupt"
    return Timeline(appeared[0], output.stat().st_size)


def kill_points(command: str, timeline: Timeline) -> list[Callable[[float, int], bool]]:
    """One kill before the write starts and the rest at random fractions of the output
    written, from a generator seeded by the command name."""
    chooser = random.Random(f"kill {command}")
    delay = chooser.uniform(0.1, 0.9) * timeline.first_temporary
    points: list[Callable[[float, int], bool]] = [lambda elapsed, size: elapsed >= delay]
    for _ in range(KILLS_PER_COMMAND - 1):
        written = int(chooser.uniform(0.05, 0.95) * timeline.output_size)
        points.append(lambda elapsed, size, written=written: size >= written)
    return points


@pytest.mark.parametrize("command", ["merge", "lora bake", "convert"])
def test_sigkill_leaves_no_output_and_intact_inputs(cli: CliServer, fault_inputs: dict[str, Path],
                                                    assert_inputs_intact: Callable[[], None],
                                                    tmp_path: Path, command: str) -> None:
    reference = tmp_path / "reference" / "out.safetensors"
    reference.parent.mkdir()
    timeline = undisturbed(cli, WRITING_COMMANDS[command](fault_inputs, reference),
                           reference.parent, reference)
    folder = tmp_path / "killed"
    folder.mkdir()
    output = folder / "out.safetensors"
    argv = WRITING_COMMANDS[command](fault_inputs, output)
    interrupted_writes = 0
    for point in kill_points(command, timeline):
        earlier = frozenset(os.listdir(folder))
        run = cli.start(*argv)
        watch(run, folder, output, point)
        writing = bool(temporaries(folder, output, earlier))
        result = run.kill()
        if result.status != -signal.SIGKILL:  # a loaded machine let it finish first
            assert result.status == 0, result.stderr
            assert_same_tensors(output, reference)
            output.unlink()
            continue
        interrupted_writes += writing
        assert not output.exists()
        assert all(_belongs(name, output) for name in os.listdir(folder))
        assert_inputs_intact()
    assert interrupted_writes >= 1, "no kill landed while the output was being written"
    result = cli.run(*argv)
    assert result.status == 0, result.stderr
    assert os.listdir(folder) == [output.name]  # the killed runs' leftovers swept
    assert_same_tensors(output, reference)


def assert_same_tensors(produced_path: Path, expected_path: Path) -> None:
    expected, produced = load_file(str(expected_path)), load_file(str(produced_path))
    assert produced.keys() == expected.keys()
    assert all(produced[key].equal(expected[key]) for key in expected)
