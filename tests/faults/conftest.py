"""Fixtures of the fault tests: the input files (built once) and their hashes, the fork
server that runs `sdkit` commands, and a read-only folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest
from fault_models import build_fault_models
from faults_cli import CliServer, sha256


@pytest.fixture(scope="session")
def fault_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Read-only inputs shared by every test: checkpoints a and b, LoRAs, VAE, embedding,
    tokenizer folder. Tests that overwrite an input work on copies."""
    return build_fault_models(tmp_path_factory.mktemp("fault-inputs"))


@pytest.fixture(scope="session")
def input_hashes(fault_inputs: dict[str, Path]) -> dict[str, str]:
    """sha256 of every input file, taken before any command ran."""
    return {name: sha256(path) for name, path in fault_inputs.items() if path.is_file()}


@pytest.fixture
def assert_inputs_intact(fault_inputs: dict[str, Path], input_hashes: dict[str, str]) -> Callable[[], None]:
    """assert_inputs_intact(): every input still has its original bytes."""
    def check() -> None:
        assert {name: sha256(fault_inputs[name]) for name in input_hashes} == input_hashes
    return check


@pytest.fixture(scope="session")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    server = CliServer(tmp_path_factory.mktemp("fault-runs"))
    yield server
    server.close()


def _try(*command: str) -> bool:
    return shutil.which(command[0]) is not None and subprocess.run(
        command, capture_output=True).returncode == 0


@pytest.fixture
def readonly_folder(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """An empty folder no file can be created in, and how it was made.

    chmod does not stop root, so as root: a read-only tmpfs mounted on it (EROFS), else
    the immutable attribute (`chattr +i`: EPERM even for root); skipped when neither is
    available (an unprivileged container on a filesystem without attributes).
    """
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder, "chmod 555"
        folder.chmod(0o755)
    elif _try("mount", "-t", "tmpfs", "-o", "ro,size=64m", "tmpfs", str(folder)):
        try:
            yield folder, "read-only tmpfs mount"
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    elif _try("chattr", "+i", str(folder)):
        try:
            yield folder, "chattr +i"
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        pytest.skip("running as root without mount or chattr: no way to make a folder read-only")
