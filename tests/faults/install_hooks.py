"""Fault hooks the fork server applies inside a command's child process, before the
command runs: stop the process at a chosen step of putting its output in place, take
renameat2 away, or hold it just before it installs its output until a partner is there.

A step is a file-system call (rename, replace, link, unlink, mkdir, rmdir, rmtree,
renameat2) on the output path or on a hidden `.<name>.…` path beside it: what building
and installing an output does at the output's own level. Writes inside the hidden folder
being built are not steps.
"""

from __future__ import annotations

import os
import shutil
import signal
from typing import Any, Callable

_OS_STEPS = ("rename", "replace", "link", "unlink", "mkdir", "rmdir")


def _about(target: str) -> Callable[[Any], bool]:
    """Whether a path argument is `target` or a hidden path of it beside it."""
    parent, name = os.path.split(os.path.abspath(target))

    def concerns(argument: Any) -> bool:
        if not isinstance(argument, (str, os.PathLike)):
            return False
        path = os.path.abspath(os.fspath(argument))
        base = os.path.basename(path)
        return os.path.dirname(path) == parent and (base == name or base.startswith(f".{name}."))

    return concerns


def _wrap(owner: Any, attribute: str, before: Callable[[tuple], None]) -> None:
    original = getattr(owner, attribute)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        before(args)
        return original(*args, **kwargs)

    setattr(owner, attribute, wrapped)


def kill_before_step(target: str, step: int) -> None:
    """SIGKILL this process right before its `step`-th (from 0) step on `target`."""
    from sdkit.io import rename

    concerns, seen = _about(target), [0]

    def count(args: tuple) -> None:
        if any(concerns(argument) for argument in args[:2]):
            if seen[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            seen[0] += 1

    for attribute in _OS_STEPS:
        _wrap(os, attribute, count)
    _wrap(shutil, "rmtree", count)
    _wrap(rename, "_renameat2", count)


def without_renameat2() -> None:
    """Behave as on a kernel, C library or file system without renameat2."""
    from sdkit.io import rename

    rename._libc_renameat2 = lambda: None


def meet_before_install(target: str, ready: int, go: int) -> None:
    """Before installing `target`, write a byte to the `ready` pipe and wait for one on `go`."""
    from sdkit.io import output_path

    wanted = os.path.abspath(target)

    def meet(args: tuple) -> None:
        if os.path.abspath(os.fspath(args[1])) == wanted:
            os.write(ready, b"r")
            os.read(go, 1)

    for attribute in ("install_file", "install_folder"):  # every output installs through these
        _wrap(output_path, attribute, meet)


def apply(hooks: dict[str, Any]) -> None:
    if hooks.get("no_renameat2"):
        without_renameat2()
    if hooks.get("kill_before_step") is not None:
        kill_before_step(*hooks["kill_before_step"])
    if hooks.get("meet") is not None:
        meet_before_install(*hooks["meet"])
