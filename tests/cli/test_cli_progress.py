"""The shared progress bar: shown on a terminal only, in bytes or in a count of any unit."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from sdkit.cli.common import progress_bar


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100), out


@pytest.mark.parametrize(("unit", "shown"), [("bytes", "3.0/10.0 kB"), ("layers", "3000 layers")])
def test_a_terminal_gets_a_bar_counting_its_unit(unit: str, shown: str) -> None:
    console, out = terminal()
    with progress_bar(console, False, "working", total=10_000, unit=unit) as advance:
        assert advance is not None
        advance(1000)
        advance(2000)
    assert "working" in out.getvalue() and shown in out.getvalue()


def test_no_bar_when_quiet_or_not_a_terminal() -> None:
    console, out = terminal()
    with progress_bar(console, True, "working") as advance:
        assert advance is None
    with progress_bar(Console(file=io.StringIO(), force_terminal=False), False, "working", unit="layers") as advance:
        assert advance is None
    assert out.getvalue() == ""
