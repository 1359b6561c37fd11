"""`sdkit` run in the test's own process through its entry point, as tests check commands
(the folder of the root conftest, tests/, is on sys.path for every test)."""

from __future__ import annotations

import pytest

from sdkit.cli.main import main


def exit_code(argv: list[str]) -> int:
    """What `sdkit ARGV` exits with (0 when it returns)."""
    try:
        main(argv)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def run_sdkit(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `sdkit ARGS`."""
    code = exit_code(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err
