"""Sending a file's bytes to the disk while the rest of it is still being produced.

Linux only starts writing dirty pages back on its own when they pass
`vm.dirty_background_ratio` of memory (10 % by default: gigabytes on a desktop) or are
30 s old, so a 2-7 GB model written in one go mostly sits in the page cache until the
final fsync, and the disk idles while the tensors are computed, then the fsync waits
for all of it. Asking for write-out of each finished stretch (`sync_file_range` with
SYNC_FILE_RANGE_WRITE: start the I/O, do not wait for it) keeps the disk busy from
the first stretch, so the whole write takes about max(compute, disk) instead of their
sum, and the fsync waits only for the tail. Clean pages are also what the kernel evicts
first when the inputs and the output together exceed memory.

Elsewhere (no `sync_file_range`), or where the call fails, nothing happens: the fsync
at the end still makes the file durable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Callable

STEP = 64 << 20  # bytes per write-out request
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call  # ctypes releases the GIL for the call: workers keep computing


_sync_file_range = _load_sync_file_range()


class EarlyWriteback:
    """Starts write-out of `fileno`'s bytes below each position it is told of, a `step`
    at a time (the caller flushes its buffers before telling)."""

    def __init__(self, fileno: int, start: int = 0, step: int | None = None) -> None:
        self.fileno = fileno
        self.started_below = start
        self.step = step or STEP
        self.enabled = _sync_file_range is not None and os.environ.get("SDKIT_EARLY_WRITEBACK") != "off"

    def due(self, position: int) -> bool:
        """Whether enough new bytes lie below `position` to ask for their write-out."""
        return self.enabled and position - self.started_below >= self.step

    def written_to(self, position: int) -> None:
        """Every byte below `position` is in the kernel: start writing what is new."""
        if not self.due(position):
            return
        assert _sync_file_range is not None
        if _sync_file_range(self.fileno, self.started_below, position - self.started_below,
                            _SYNC_FILE_RANGE_WRITE) != 0:
            self.enabled = False  # e.g. a file system without it: the final fsync does all
            return
        self.started_below = position
