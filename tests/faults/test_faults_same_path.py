"""Output path equal to an input path.

Without --force every command refuses (one line, exit 1, the input untouched). With
--force a command either still refuses (convert, merge, vae swap / extract, and embed add
over the model) or replaces the input atomically: while it runs, the path always holds
a complete file, the original or the final one, never anything in between, and the
final one is what the same command writes to a fresh path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest
from faults_cli import WRITING_COMMANDS, CliServer, assert_one_error_line, sha256
from safetensors.torch import load_file

# the inputs each command reads, by fixture name (tokenizer folders aside)
COMMAND_INPUTS = {
    "convert": ("a",), "merge": ("a", "b"), "lora bake": ("a", "lora"), "lora extract": ("b", "a"),
    "lora merge": ("lora", "lora2"), "lora resize": ("lora",), "vae swap": ("a", "vae"),
    "vae extract": ("a",), "embed add": ("a", "embedding"),
}
# inputs a command refuses as its output even with --force (convert, merge and the vae
# commands check every input path; embed add checks the model's)
REFUSED_WITH_FORCE = {("convert", "a"), ("merge", "a"), ("merge", "b"), ("vae swap", "a"),
                      ("vae swap", "vae"), ("vae extract", "a"), ("embed add", "a")}
CASES = [(command, role) for command, roles in sorted(COMMAND_INPUTS.items()) for role in roles]


@pytest.fixture
def copied_inputs(fault_inputs: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A private copy of every input: these tests may overwrite them."""
    copies = {}
    for name, path in fault_inputs.items():
        copies[name] = tmp_path / path.name
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, copies[name])
    return copies


@pytest.fixture(scope="module")
def reference_outputs(cli: CliServer, fault_inputs: dict[str, Path],
                      tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """command -> what it writes to a fresh path (made on first use)."""
    folder = tmp_path_factory.mktemp("reference")

    class Outputs(dict):
        def __missing__(self, command: str) -> Path:
            output = folder / command.replace(" ", "-") / "out.safetensors"
            output.parent.mkdir()
            result = cli.run(*WRITING_COMMANDS[command](fault_inputs, output))
            assert result.status == 0, result.stderr
            self[command] = output
            return output

    return Outputs()


class PathWatcher:
    """Records the sha256 of every version of a file seen under one path: re-read
    whenever its inode, size or modification time changes (one open, so one inode)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hashes: dict[tuple[int, int, int], str] = {}

    def look(self) -> str:
        try:
            with open(self.path, "rb") as file:
                status = os.fstat(file.fileno())
                version = (status.st_ino, status.st_size, status.st_mtime_ns)
                if version not in self.hashes:
                    self.hashes[version] = hashlib.sha256(file.read()).hexdigest()
                return self.hashes[version]
        except FileNotFoundError:
            return "missing"

    def seen(self) -> set[str]:
        return set(self.hashes.values())


@pytest.mark.parametrize(("command", "role"), CASES)
def test_output_over_an_input_needs_force(cli: CliServer, copied_inputs: dict[str, Path],
                                          command: str, role: str) -> None:
    target = copied_inputs[role]
    before = sha256(target)
    result = cli.run(*WRITING_COMMANDS[command](copied_inputs, target))
    assert_one_error_line(result, str(target))
    assert sha256(target) == before


@pytest.mark.parametrize(("command", "role"), CASES)
def test_forced_output_over_an_input_is_atomic(cli: CliServer, copied_inputs: dict[str, Path],
                                               reference_outputs: dict[str, Path],
                                               command: str, role: str) -> None:
    target = copied_inputs[role]
    before = sha256(target)
    run = cli.start(*WRITING_COMMANDS[command](copied_inputs, target), "--force")
    watcher = PathWatcher(target)
    while run.poll() is None:
        assert watcher.look() != "missing"
        time.sleep(0.001)
    result = run.wait()
    after = watcher.look()
    seen = watcher.seen()
    if (command, role) in REFUSED_WITH_FORCE:
        assert_one_error_line(result, str(target))
        assert seen | {after} == {before}
        return
    assert result.status == 0, result.stderr
    assert seen <= {before, after}, "a partial file was visible under the input's name"
    expected = load_file(str(reference_outputs[command]))
    produced = load_file(str(target))
    assert produced.keys() == expected.keys()
    assert all(produced[key].equal(expected[key]) for key in expected)
