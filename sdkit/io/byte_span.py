"""Tensors whose bytes already lie, unchanged, in an open file: copied by the kernel.

A tensor written exactly as an input stores it (a plain copy, a renamed or reshaped key)
need not pass through Python or torch: its bytes are a contiguous span of the input
file. The writer copies such spans with `copy_file_range` (no user-space copy, no page
faults on a mapping), falling back to `sendfile`, then to read+write, where the file
systems do not allow it.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdkit.errors import SdkitError

if TYPE_CHECKING:
    import torch

_COPY_STEP = 1 << 30  # bytes per system call (the calls take at most ~2 GiB)
# errors that mean "this way of copying is not available here", not a failed copy
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTSUP, errno.EPERM}


@dataclass(frozen=True)
class ByteSpan:
    """`length` bytes at `offset` in the open file `fileno` (of `path`, for messages)."""

    path: str
    fileno: int
    offset: int
    length: int


def copy_span(span: ByteSpan, target: int) -> None:
    """Append the span's bytes at the current position of the file descriptor `target`."""
    done = 0
    for copy in (_copy_file_range, _sendfile, _read_write):
        try:
            done = copy(span, target, done)
            return
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED or copy is _read_write:
                raise
    raise AssertionError("unreachable")


def _copy_file_range(span: ByteSpan, target: int, done: int) -> int:
    while done < span.length:
        count = os.copy_file_range(span.fileno, target, min(_COPY_STEP, span.length - done),
                                   offset_src=span.offset + done)
        done = _advance(span, done, count)
    return done


def _sendfile(span: ByteSpan, target: int, done: int) -> int:
    while done < span.length:
        count = os.sendfile(target, span.fileno, span.offset + done, min(_COPY_STEP, span.length - done))
        done = _advance(span, done, count)
    return done


def _read_write(span: ByteSpan, target: int, done: int) -> int:
    while done < span.length:
        chunk = os.pread(span.fileno, min(16 << 20, span.length - done), span.offset + done)
        view = memoryview(chunk)
        while view:
            view = view[os.write(target, view):]
        done = _advance(span, done, len(chunk))
    return done


def _advance(span: ByteSpan, done: int, count: int) -> int:
    if count <= 0:
        raise SdkitError(f"{span.path}: ended {span.length - done} bytes early (the file was cut "
                         "short while being read)")
    return done + count


def read_into(span: ByteSpan, start: int, target: memoryview) -> None:
    """Fill `target` with the span's bytes from `start` on (read, not mapped)."""
    done = 0
    while done < len(target):
        done = _advance(span, done, os.preadv(span.fileno, [target[done:]], span.offset + start + done))


def read_elements(span: ByteSpan, dtype: "torch.dtype", start: int, count: int) -> "torch.Tensor":
    """Elements [start, start+count) of the span as a 1-D tensor, read (not mapped): the
    memory is the caller's alone and freed with the tensor."""
    import torch

    size = dtype.itemsize
    buffer = bytearray(count * size)
    read_into(span, start * size, memoryview(buffer))
    return torch.frombuffer(buffer, dtype=dtype) if count else torch.empty(0, dtype=dtype)
