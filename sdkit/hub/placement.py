"""Putting a file at its destination without ever clobbering another one.

Policies when the name is taken: "refuse" (the default: say so and suggest --rename or
--force), "rename" (the first free `name (n).ext`), "overwrite" (atomic replace). An
identical file already there (same sha256) is "already present", whatever the policy.
Without overwrite the final step is a hard link, which fails instead of replacing when a
concurrent writer took the name first; filesystems without hard links fall back to a
check-then-rename.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sdkit.errors import SdkitError
from sdkit.hub.jobstate import is_locked, load_state, part_path, remove_job, state_path
from sdkit.hub.names import free_name
from sdkit.io import hash_file

Policy = Literal["refuse", "rename", "overwrite"]
Method = Literal["move", "copy", "link"]
POLICIES: tuple[Policy, ...] = ("refuse", "rename", "overwrite")
_NO_HARDLINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EACCES}
_RACE_RETRIES = 20


class AlreadyPresent(Exception):
    """The very same bytes are already at `path`: nothing to download or place."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = path


@dataclass
class Placed:
    path: Path
    status: Literal["installed", "already-present"]


def same_content(path: Path, sha256: str | None) -> bool:
    return sha256 is not None and path.is_file() and hash_file(path).sha256 == sha256.lower()


def _taken_message(target: Path) -> str:
    return (f"{target}: a different file already has this name; use --rename to keep both "
            "or --force to replace it")


def choose_download_name(folder: Path, name: str, *, sha256: str | None, size: int | None,
                         policy: Policy) -> str:
    """The name a new download gets in `folder`, decided before any byte is fetched.

    Raises AlreadyPresent when the file is there already, SdkitError when the name is
    taken by a different file and the policy is "refuse". With an unknown sha256 and an
    equal size the bytes are compared after the download (by `place`).
    """
    name = _clear_foreign_part(folder, name, policy)
    target = folder / name
    if not target.exists():
        return name
    if same_content(target, sha256):
        raise AlreadyPresent(target)
    if policy == "overwrite":
        return name
    if policy == "rename":
        return free_name(folder, name)
    if sha256 is not None or (size is not None and size != target.stat().st_size):
        raise SdkitError(_taken_message(target))
    return name


def _clear_foreign_part(folder: Path, name: str, policy: Policy) -> str:
    """A .part of this name from a download of another URL: a stale one of ours goes,
    a live one (or one some other program left) is stepped around or refused."""
    if not part_path(folder, name).exists():
        return name
    if not is_locked(folder, name) and load_state(state_path(folder, name)) is not None:
        remove_job(folder, name)
        return name
    if policy == "rename":
        return free_name(folder, name)
    raise SdkitError(f"{part_path(folder, name)}: another download is using this name; "
                     "use --rename to download beside it")


def place(source: Path, folder: Path, name: str, sha256: str, *, policy: Policy,
          method: Method = "move") -> Placed:
    """Put `source` (whose sha256 is known) at `folder/name` under `policy`.

    When an identical file is already there `source` is left alone, whatever the method.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(_RACE_RETRIES):
        target = folder / name
        if target.exists() and policy != "overwrite":
            if target.resolve() == source.resolve() or same_content(target, sha256):
                return Placed(target, "already-present")
            if policy == "refuse":
                raise SdkitError(_taken_message(target))
            name = free_name(folder, name)
            continue
        try:
            _put(source, target, overwrite=policy == "overwrite", method=method)
            return Placed(target, "installed")
        except FileExistsError:  # another process took the name between check and link
            continue
    raise SdkitError(f"{folder / name}: could not find a free name")


def _put(source: Path, target: Path, *, overwrite: bool, method: Method) -> None:
    if method == "copy":
        temp = target.with_name(f".{target.name}.{os.getpid()}.copying")
        try:
            shutil.copy2(source, temp)
            _link_or_rename(temp, target, overwrite=overwrite)
        finally:
            temp.unlink(missing_ok=True)
        return
    if method == "link":
        _hard_or_symbolic_link(source, target, overwrite=overwrite)
        return
    try:
        _link_or_rename(source, target, overwrite=overwrite)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _put(source, target, overwrite=overwrite, method="copy")  # another filesystem
        source.unlink()


def _link_or_rename(source: Path, target: Path, *, overwrite: bool) -> None:
    """Move `source` to `target` atomically; without `overwrite`, never replace a file."""
    if overwrite:
        os.replace(source, target)
        return
    try:
        os.link(source, target)  # fails with FileExistsError instead of replacing
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARDLINK or exc.errno == errno.EXDEV:
            raise
        if target.exists():
            raise FileExistsError(str(target)) from None
        os.replace(source, target)
        return
    source.unlink()


def _hard_or_symbolic_link(source: Path, target: Path, *, overwrite: bool) -> None:
    temp = target.with_name(f".{target.name}.{os.getpid()}.linking") if overwrite else target
    try:
        os.link(source, temp)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARDLINK:
            raise
        os.symlink(source.resolve(), temp)  # another filesystem: a symbolic link instead
    if overwrite:
        os.replace(temp, target)
