"""`sdkit inspect` starts fast: it imports neither torch nor numpy, and `sdkit --help`
imports no command module.

Importing torch takes seconds and numpy tens of milliseconds, where the whole of
`sdkit inspect --json` on a full-size checkpoint takes under 100 ms (`make bench` reports
it: tests/bench/test_bench_cli.py). Here the imports are checked exactly, and the time
only against a bound loose enough for a loaded machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from header_only import write_header_only_checkpoint

from sdkit.cli.main import COMMANDS, cli, load_command

HEAVY = ("torch", "numpy", "diffusers", "transformers", "safetensors")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_header_only_checkpoint(tmp_path_factory.mktemp("startup") / "sd1.safetensors")


def imported_by(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """`python -X importtime -m sdkit ARGS`: the process and the modules it imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "sdkit", *args],
                          capture_output=True, text=True, timeout=120)
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    return done, modules


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_inspect_json_imports_neither_torch_nor_numpy_nor_rich(checkpoint: Path) -> None:
    done, modules = imported_by("inspect", "--json", str(checkpoint))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert (report["kind"], report["family"], report["tensors"]) == ("checkpoint", "sd1", 1085)
    assert report["size_bytes"] == checkpoint.stat().st_size
    assert not top_level(modules) & {*HEAVY, "rich"}, sorted(top_level(modules) & {*HEAVY, "rich"})
    assert not {name for name in modules if name.endswith("_cmd")} - {"sdkit.cli.inspect_cmd"}


def test_inspect_tables_import_neither_torch_nor_numpy(checkpoint: Path) -> None:
    done, modules = imported_by("inspect", str(checkpoint))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "checkpoint" in done.stdout and "EMA weights present" in done.stdout
    assert not top_level(modules) & set(HEAVY)


def test_help_imports_no_command_module() -> None:
    done, modules = imported_by("--help")
    assert done.returncode == 0
    assert not {name for name in modules if name.endswith("_cmd")}
    assert not top_level(modules) & {*HEAVY, "rich"}
    for name in COMMANDS:
        assert f"\n  {name} " in done.stdout


# ---- the command table ------------------------------------------------------------------

def test_the_table_lists_every_command_its_module_defines() -> None:
    loaded = {name: load_command(name) for name in COMMANDS}
    assert all(command.name == name for name, command in loaded.items())
    assert set(cli.commands) == set(COMMANDS)  # the modules attach nothing else


@pytest.mark.parametrize("limit", [20, 45, 74, 200])
def test_the_table_short_help_is_the_commands_own(limit: int) -> None:
    """`sdkit --help` lists the table's text without importing the commands."""
    for name, (_, short_help) in COMMANDS.items():
        own = load_command(name).get_short_help_str(limit)
        assert click.utils.make_default_short_help(short_help, limit) == own, name
