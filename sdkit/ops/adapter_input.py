"""`FILE[:STRENGTH]`, the adapter argument every applying command shares.

Kept apart from the bake planner (which needs torch) so that the command line can read
and check its arguments before importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterInput:
    """One adapter to apply, with its strength (`FILE[:STRENGTH]` on the command line)."""

    path: str
    strength: float = 1.0


def parse_adapter_arg(text: str) -> AdapterInput:
    """`FILE[:STRENGTH]`; a trailing `:number` is the strength (Windows drive colons stay)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail.startswith(("\\", "/")):
        try:
            return AdapterInput(head, float(tail))
        except ValueError:
            pass
    return AdapterInput(text, 1.0)
