"""A full disk and a read-only output folder: every writing command stops with one error
line and exit 1, leaves nothing under the output name and no temporary file, and never
touches its inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from faults_cli import FOLDER_COMMANDS, WRITING_COMMANDS, CliServer, assert_one_error_line

# below the size of every command's output, above the tokenizer files embed add writes
FILE_SIZE_LIMIT = 96 * 1024
# command -> (argument list, output name)
COMMANDS = {**{name: (argv, "out.safetensors") for name, argv in WRITING_COMMANDS.items()},
            **{name: (argv, "out") for name, argv in FOLDER_COMMANDS.items()}}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_full_disk_is_one_line_and_leaves_nothing(cli: CliServer, fault_inputs: dict[str, Path],
                                                   assert_inputs_intact: Callable[[], None],
                                                   tmp_path: Path, command: str) -> None:
    # RLIMIT_FSIZE with SIGXFSZ ignored: the write past the limit fails with EFBIG, which
    # is what a full disk (ENOSPC) looks like to the writer
    argv, name = COMMANDS[command]
    output = tmp_path / name
    result = cli.run(*argv(fault_inputs, output), fsize=FILE_SIZE_LIMIT)
    assert_one_error_line(result, str(output), "File too large")
    assert sorted(tmp_path.iterdir()) == []
    assert_inputs_intact()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_readonly_folder_is_one_line(cli: CliServer, fault_inputs: dict[str, Path],
                                     readonly_folder: tuple[Path, str],
                                     assert_inputs_intact: Callable[[], None], command: str) -> None:
    folder, how = readonly_folder
    argv, name = COMMANDS[command]
    output = folder / name
    result = cli.run(*argv(fault_inputs, output))
    line = assert_one_error_line(result, str(folder))
    assert any(reason in line for reason in ("Read-only file system", "Operation not permitted",
                                             "Permission denied")), (how, line)
    assert sorted(folder.iterdir()) == []
    assert_inputs_intact()
