"""Where outputs are built, how they are put in place, and the rule every writing
command applies to its output path before it reads anything.

An output that already exists, or that is one of the command's inputs (the same file or
folder, however spelled: links and relative paths included), is replaced only when the
caller forces it. Replacing an input is safe because every writer builds its output
beside the target and installs it once complete, while the inputs, opened or
memory-mapped before, go on reading the old file: on POSIX its inode lives until the
last handle is closed.

Outputs are built under `.<name>.<host>-<pid>.<random>.partial` beside the target and
installed in one step where the system allows it:
- a file: one rename. Without force it must not replace anything, not even a file that
  another writer installed a moment ago: renameat2(RENAME_NOREPLACE), else a hard link
  (which fails on an existing name) and the partial name unlinked, else (file systems
  without either) a check just before the rename;
- a folder without force: renameat2(RENAME_NOREPLACE), else the name claimed with mkdir
  (which fails on anything existing) and the built folder renamed over that empty claim;
- a folder with force over an existing one: renameat2(RENAME_EXCHANGE) swaps the two in
  one step and the old one, now under the partial name, is removed. Where the exchange
  is not available the old one is first renamed to `.<name>.<host>-<pid>.<random>.previous`,
  then the new one into place, then the old one removed.

A process killed outright cannot clean up, so each new write of a target first looks at
what processes of this host that are gone left beside it: partial files and folders are
removed; a `.previous` is put back under the target's name when nothing is there (the
kill came between the two renames), and removed otherwise.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from sdkit.errors import SdkitError
from sdkit.io import rename

PathLike = str | os.PathLike[str]
T = TypeVar("T")
# os.link errors of file systems that have no hard links (vfat, exFAT, some FUSE ones)
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK})


class OutputExists(SdkitError):
    """The output is there already and the caller may not replace it."""

    def __init__(self, path: PathLike) -> None:
        super().__init__(f"{path}: already exists (overwriting needs --force)")


def same_file(first: PathLike, second: PathLike) -> bool:
    """Whether two paths name one existing file or folder."""
    try:
        return os.path.samefile(first, second)
    except (OSError, ValueError):  # a missing path, or one the OS cannot represent
        return False


def check_output_path(output: PathLike, inputs: Iterable[PathLike | None], *, force: bool) -> None:
    """Refuse `output`, unless `force`, when it is one of `inputs` (None entries: inputs
    not given) or already exists. An output that a killed replacement left set aside is
    put back first, so that it counts as existing."""
    path = Path(output)
    sweep_dead_partials(path)
    if force:
        return
    if any(given is not None and same_file(path, given) for given in inputs):
        raise SdkitError(f"{path}: is one of the inputs (use --force to replace it)")
    if os.path.lexists(path):
        raise OutputExists(path)


# the host in a partial file's name: only partial files of this host can be known dead
_HOST = socket.gethostname().replace(".", "_").replace("/", "_") or "host"


def _owned_path(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.{kind}"


def partial_path(path: Path) -> Path:
    """Where `path` is built before it is complete: hidden, beside it, naming its owner."""
    return _owned_path(path, "partial")


def sweep_dead_partials(path: Path) -> list[Path]:
    """Clear what processes (of this host) that are gone left beside `path`: partial
    files and folders are removed; a replaced output set aside (`.previous`) is put back
    when `path` is missing, else removed. Returns the paths removed or put back."""
    prefix = f".{path.name}.{_HOST}-"
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    handled = []
    for entry in entries:
        kind = entry.name.rsplit(".", 1)[-1]
        if not entry.name.startswith(prefix) or kind not in ("partial", "previous"):
            continue
        pid = entry.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        if kind == "previous" and not os.path.lexists(path):
            _put_back(Path(entry.path), path)  # the only copy of the output: never removed
        else:
            remove_quietly(Path(entry.path))
        handled.append(Path(entry.path))
    return handled


def _put_back(previous: Path, path: Path) -> None:
    """Rename a set-aside output back to `path`, unless something took its place."""
    try:
        if not rename.rename_noreplace(previous, path) and not os.path.lexists(path):
            os.rename(previous, path)
    except OSError:
        pass  # left as it is: the next write tries again


def remove_quietly(path: Path) -> None:
    """Remove a file or folder we made, ignoring errors (the original one is worth more)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


# --------------------------------------------------------------------------- installing


def install_file(partial: Path, target: Path, *, replace: bool) -> None:
    """Put the finished file `partial` at `target` in one step. Without `replace` an
    existing `target`, even one that appeared a moment ago, is kept and OutputExists
    raised (`partial` stays for the caller to remove)."""
    if replace:
        os.replace(partial, target)
        return
    try:
        installed = rename.rename_noreplace(partial, target) or _link_in_place(partial, target)
    except FileExistsError:
        raise OutputExists(target) from None
    if not installed:  # no way to refuse atomically here: check right before the rename
        if os.path.lexists(target):
            raise OutputExists(target)
        os.rename(partial, target)


def _link_in_place(partial: Path, target: Path) -> bool:
    """Hard-link `partial` as `target` (fails on an existing name), then drop its partial
    name. False where the file system has no hard links."""
    try:
        os.link(partial, target)
    except OSError as exc:
        if exc.errno in _NO_HARD_LINKS:
            return False
        raise
    os.unlink(partial)
    return True


def install_folder(built: Path, target: Path, *, replace: bool) -> None:
    """Put the finished folder `built` at `target`. Without `replace` an existing
    `target` (even an empty folder) is kept and OutputExists raised. With it an existing
    output is swapped with the new one in one step where the system can, else set aside
    under a name the sweeper puts back, until the new one is in place; then removed."""
    if not replace or not os.path.lexists(target):
        try:
            _install_new_folder(built, target)
            return
        except OutputExists:
            if not replace:
                raise  # else it appeared meanwhile: replace it like any other
    if rename.rename_exchange(built, target):
        remove_quietly(built)  # the old output, under the partial name now
        return
    _replace_setting_aside(built, target)


def _install_new_folder(built: Path, target: Path) -> None:
    try:
        if rename.rename_noreplace(built, target):
            return
        os.mkdir(target)  # claims the name: fails on anything there, unlike a rename
    except FileExistsError:
        raise OutputExists(target) from None
    try:
        os.rename(built, target)  # over our own empty claim
    except BaseException:
        _remove_empty_folder(target)
        raise


def _replace_setting_aside(built: Path, target: Path) -> None:
    previous = _owned_path(target, "previous")
    try:
        os.rename(target, previous)
        os.rename(built, target)
    except BaseException:
        if os.path.lexists(previous) and not os.path.lexists(target):
            os.rename(previous, target)
        raise
    remove_quietly(previous)


def _remove_empty_folder(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def fsync_folder(folder: Path) -> None:
    """Make renames in `folder` durable; folders cannot be opened on every platform (best effort)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_file_atomically(path: Path, produce: Callable[[Path], object], *, overwrite: bool) -> Path:
    """Have `produce(partial)` write the whole file at a hidden path beside `path`, make
    it durable and install it. An OSError becomes one `cannot write` line; on any failure
    the partial file is removed and `path` is untouched."""
    sweep_dead_partials(path)
    if os.path.lexists(path) and not overwrite:
        raise OutputExists(path)
    partial = partial_path(path)
    try:
        produce(partial)
        _fsync_file(partial)
        install_file(partial, path, replace=overwrite)
    except BaseException as exc:
        remove_quietly(partial)
        if isinstance(exc, OSError):
            raise SdkitError(f"{path}: cannot write: {exc.strerror or exc}") from None
        raise
    fsync_folder(path.parent)
    return path


def build_in_partial(target: Path, overwrite: bool, fill: Callable[[Path], T]) -> T:
    """Run `fill(folder)` on a fresh hidden folder beside `target`, then install it there."""
    sweep_dead_partials(target)
    if os.path.lexists(target) and not overwrite:
        raise OutputExists(target)
    if not target.parent.is_dir():
        raise SdkitError(f"{target.parent}: no such folder")
    built = partial_path(target)
    try:
        built.mkdir()
        result = fill(built)
        install_folder(built, target, replace=overwrite)
    except BaseException as exc:
        remove_quietly(built)
        if isinstance(exc, OSError):
            raise SdkitError(f"{target}: cannot write: {exc.strerror or exc}") from None
        if isinstance(exc, SdkitError) and str(built) in str(exc):
            # name a file as the output will hold it, not inside a hidden folder that is gone
            raise SdkitError(str(exc).replace(str(built), str(target))) from None
        raise
    fsync_folder(target.parent)
    return result


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
