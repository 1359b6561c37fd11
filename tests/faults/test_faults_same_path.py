"""Output path equal to an input path, for every command that writes a file.

Without --force every command refuses with one line, `sdkit: error: <path>: is one of the
inputs (use --force to replace it)`, exit 1 and the input untouched. With --force every
command replaces the input atomically: while it runs, the path always holds a complete
file, the original or the final one, never anything in between, and the final one is
what the same command writes to a fresh path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import pytest
from faults_cli import REPO, WRITING_COMMANDS, CliServer, Finished, sha256
from safetensors.torch import load_file

TOY = REPO / "fixtures" / "toy" / "sd1"
# the fault commands, plus LoRA and embedding conversions and a one-step LoRA training
# (on the toy model: a trainer needs a model that loads as a pipeline)
COMMANDS: dict[str, Callable[[dict[str, Path], Path], list[str]]] = {
    **WRITING_COMMANDS,
    "convert lora": lambda i, out: ["convert", str(i["lora"]), "-o", str(out), "--to", "diffusers"],
    "convert embedding": lambda i, out: ["convert", str(i["embedding"]), "-o", str(out), "--dtype", "fp16"],
    "train lora": lambda i, out: ["train", "lora", "--base", str(i["toy"]), "--config", str(TOY / "diffusers"),
                                  "--data", str(i["pictures"]), "-o", str(out), "--steps", "1",
                                  "--resolution", "64", "--rank", "2", "--device", "cpu", "--precision", "fp32"],
}
# the inputs each command reads, by fixture name (tokenizer and config folders aside)
COMMAND_INPUTS = {
    "convert": ("a",), "merge": ("a", "b"), "lora bake": ("a", "lora"), "lora extract": ("b", "a"),
    "lora merge": ("lora", "lora2"), "lora resize": ("lora",), "vae swap": ("a", "vae"),
    "vae extract": ("a",), "convert lora": ("lora",),
    "convert embedding": ("embedding",), "train lora": ("toy",),
}
CASES = [(command, role) for command, roles in sorted(COMMAND_INPUTS.items()) for role in roles]


@pytest.fixture(scope="module")
def inputs(fault_inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fault inputs, the toy model and two captioned pictures to train on."""
    from PIL import Image

    pictures = tmp_path_factory.mktemp("pictures")
    for index, colour in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), colour).save(pictures / f"{index}.png")
        (pictures / f"{index}.txt").write_text(f"a {colour} square", "utf-8")
    return {**fault_inputs, "toy": TOY / "toy-sd1.safetensors", "pictures": pictures}


@pytest.fixture
def copied_inputs(inputs: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A private copy of every input: these tests may overwrite them."""
    copies = {}
    for name, path in inputs.items():
        copies[name] = tmp_path / path.name
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, copies[name])
    return copies


@pytest.fixture(scope="module")
def reference_outputs(cli: CliServer, inputs: dict[str, Path],
                      tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """command -> what it writes to a fresh path (made on first use)."""
    folder = tmp_path_factory.mktemp("reference")

    class Outputs(dict):
        def __missing__(self, command: str) -> Path:
            output = folder / command.replace(" ", "-") / "out.safetensors"
            output.parent.mkdir()
            result = cli.run(*COMMANDS[command](inputs, output))
            assert result.status == 0, result.stderr
            self[command] = output
            return output

    return Outputs()


def assert_refused_as_input(result: Finished, target: Path) -> None:
    """Exit 1 and, on stderr, the one line of the rule."""
    assert result.status == 1, result.stderr
    assert result.error_lines == [f"sdkit: error: {target}: is one of the inputs (use --force to replace it)"], \
        result.stderr


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
    result = cli.run(*COMMANDS[command](copied_inputs, target))
    assert_refused_as_input(result, target)
    assert sha256(target) == before


@pytest.mark.parametrize(("command", "role"), CASES)
def test_forced_output_over_an_input_is_atomic(cli: CliServer, copied_inputs: dict[str, Path],
                                               reference_outputs: dict[str, Path],
                                               command: str, role: str) -> None:
    target = copied_inputs[role]
    before = sha256(target)
    run = cli.start(*COMMANDS[command](copied_inputs, target), "--force")
    watcher = PathWatcher(target)
    while run.poll() is None:
        assert watcher.look() != "missing"
        time.sleep(0.001)
    result = run.wait()
    after = watcher.look()
    assert result.status == 0, result.stderr
    assert after != before and watcher.seen() <= {before, after}, "a partial file was visible under the input's name"
    expected = load_file(str(reference_outputs[command]))
    produced = load_file(str(target))
    assert produced.keys() == expected.keys()
    assert all(produced[key].equal(expected[key]) for key in expected)
