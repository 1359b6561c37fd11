"""Command-line start-up: `sdkit inspect` on a full-size checkpoint, whole process, against
the start-up of a bare `python -c pass` and of `import click` measured in the same run.

The checkpoint is header-only (its data region a hole of the real size: inspect reads the
header and the CLIP position ids, nothing else), so the bench needs no model files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from bench_measure import measure, sdkit
from header_only import write_header_only_checkpoint

RUNS = 11  # best of: start-up times are a few tens of ms, other load shifts them by as much
TARGET = 0.1  # seconds, `sdkit inspect --json` as a whole process


def best_walls(commands: dict[str, list[str]]) -> dict[str, float]:
    """The fastest of RUNS runs of each command, interleaved so all see the same load."""
    walls = {name: float("inf") for name in commands}
    for _ in range(RUNS):
        for name, argv in commands.items():
            measured = measure(argv)
            assert measured.ok, measured.error
            walls[name] = min(walls[name], measured.wall)
    return walls


def test_bench_inspect_startup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an installed package carries its bytecode; a checkout writes it on the first run
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    model = str(write_header_only_checkpoint(tmp_path / "sd1.safetensors"))
    commands = {
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
        "python -c 'import click'": [sys.executable, "-c", "import click"],
        "sdkit --help": sdkit("--help"),
        "sdkit inspect --json": sdkit("inspect", "--json", model),
        "sdkit inspect (tables)": sdkit("inspect", model),
    }
    for argv in commands.values():
        measure(argv)  # bytecode and page cache
    walls = best_walls(commands)
    baseline = walls["python -c pass (baseline)"]
    print(f"\ncli start-up: header-only SD1 checkpoint ({os.path.getsize(model) / 2**20:.0f} MiB, "
          f"1085 tensors), best of {RUNS}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    for name, wall in walls.items():
        print(f"  {name:<30} {wall * 1000:7.1f} ms  {wall / baseline:5.2f}x baseline")
    assert walls["sdkit inspect --json"] <= TARGET
