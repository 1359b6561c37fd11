"""Renames that refuse an existing target or swap two paths: Linux renameat2(2).

`os.rename` replaces what it finds (an empty folder included) and cannot swap two paths,
so installing an output without --force can silently replace another writer's, and
replacing a folder needs two renames with the old one hidden in between. renameat2 does
both in one step: RENAME_NOREPLACE fails with EEXIST when the target exists,
RENAME_EXCHANGE swaps two existing paths (a file and a folder alike).

Python has no binding, so it is called through the C library (glibc 2.28 and later).
Where the kernel, the C library or the file system lacks it (ENOSYS; EINVAL from file
systems without these flags, e.g. NFS and some FUSE ones; no such symbol on musl or
macOS) the functions return False and the caller falls back to something weaker.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys
from typing import Any, Callable

RENAME_NOREPLACE = 1  # <linux/fs.h>
RENAME_EXCHANGE = 2
_AT_FDCWD = -100  # paths relative to the working directory, as os.rename takes them
# "not available here", as opposed to a real failure (EEXIST, EACCES, ENOSPC, ...)
_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})

PathLike = str | os.PathLike[str]


@functools.cache
def _libc_renameat2() -> Callable[..., Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _renameat2(source: PathLike, target: PathLike, flags: int) -> bool:
    function = _libc_renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), os.fspath(source), None, os.fspath(target))


def rename_noreplace(source: PathLike, target: PathLike) -> bool:
    """Rename `source` to `target` unless `target` exists (FileExistsError then).
    False, with nothing done, where this cannot be done in one step."""
    return _renameat2(source, target, RENAME_NOREPLACE)


def rename_exchange(first: PathLike, second: PathLike) -> bool:
    """Swap two existing paths in one step. False, with nothing done, where this cannot
    be done in one step."""
    return _renameat2(first, second, RENAME_EXCHANGE)
