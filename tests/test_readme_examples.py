"""The README's runnable examples run as written, in order, from the repository root.

A block marked `<!-- runnable examples: … -->` is a list of shell lines: `sdkit …`
(run in this process through the CLI's entry point), `python …` (a subprocess), joined
with `&&`. `/tmp/` is a fresh folder of the test. A line's comment `(exit N)` says the
exit code it must end with, else 0. Training runs take fewer steps and class pictures
here (`--steps 2`, `--num-class-images 1`) except the LoRA that `sdkit verify` checks: the
options, paths and outputs are what is tested, not how well a concept is learned
(tests/runtime/test_train_toy.py does that).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cli_run import exit_code

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_BLOCK = re.compile(r"<!-- runnable examples: [^>]*-->\s*```sh\n(.*?)```", re.DOTALL)
_EXIT = re.compile(r"\(exit (\d+)\)")

pytestmark = pytest.mark.slow


def runnable_lines() -> list[tuple[str, int]]:
    """(shell line, expected exit code) of every runnable block, in README order."""
    lines: list[tuple[str, int]] = []
    for block in _BLOCK.findall(README.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                expected = _EXIT.search(line.partition("#")[2])
                lines.append((line, int(expected[1]) if expected else 0))
    return lines


def commands(line: str, scratch: Path) -> list[list[str]]:
    words = shlex.split(line.replace("/tmp/", f"{scratch}/"), comments=True)
    commands, current = [], []
    for word in words:
        if word == "&&":
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [*commands, current]


def quicker(argv: list[str]) -> list[str]:
    """Fewer training steps and class pictures, except for the LoRA the verify example checks."""
    argv = list(argv)
    for option, value in (("--steps", "2"), ("--num-class-images", "1")):
        if argv[:2] != ["train", "lora"] and option in argv:
            argv[argv.index(option) + 1] = value
    return argv


def run(argv: list[str]) -> int:
    if argv[0] == "python":
        return subprocess.run([sys.executable, *argv[1:]], cwd=ROOT).returncode
    assert argv[0] == "sdkit", argv
    return exit_code(quicker(argv[1:]))


def test_there_are_runnable_examples_of_every_command_group():
    groups = {commands(line, Path("/x"))[0][1] for line, _ in runnable_lines() if line.startswith("sdkit")}
    assert {"inspect", "convert", "merge", "hash", "lora", "vae", "sample", "library", "train", "embed",
            "hypernet", "verify"} <= groups


def test_every_runnable_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    for line, expected in runnable_lines():
        for argv in commands(line, tmp_path):
            code = run(argv)
            err = capsys.readouterr().err
            assert code == expected, f"{line}\n{err}"
            assert "Traceback" not in err, line
