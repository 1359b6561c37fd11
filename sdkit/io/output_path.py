"""The rule every writing command applies to its output path before it reads anything.

An output that already exists, or that is one of the command's inputs (the same file or
folder, however spelled: links and relative paths included), is replaced only when the
caller forces it. Replacing an input is safe because every writer builds its output
beside the target and renames it into place once complete, while the inputs, opened or
memory-mapped before, go on reading the old file: on POSIX its inode lives until the
last handle is closed.

Outputs are built under `.<name>.<host>-<pid>.<random>.partial` beside the target. A
process killed outright cannot clean up, so each new write of a target first removes the
partial files and folders of that target left by processes of this host that are gone.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterable

from sdkit.errors import SdkitError

PathLike = str | os.PathLike[str]


def same_file(first: PathLike, second: PathLike) -> bool:
    """Whether two paths name one existing file or folder."""
    try:
        return os.path.samefile(first, second)
    except (OSError, ValueError):  # a missing path, or one the OS cannot represent
        return False


def check_output_path(output: PathLike, inputs: Iterable[PathLike | None], *, force: bool) -> None:
    """Refuse `output`, unless `force`, when it is one of `inputs` (None entries: inputs
    not given) or already exists."""
    if force:
        return
    path = Path(output)
    if any(given is not None and same_file(path, given) for given in inputs):
        raise SdkitError(f"{path}: is one of the inputs (use --force to replace it)")
    if path.exists():
        raise SdkitError(f"{path}: already exists (overwriting needs --force)")


# the host in a partial file's name: only partial files of this host can be known dead
_HOST = socket.gethostname().replace(".", "_").replace("/", "_") or "host"


def partial_path(path: Path) -> Path:
    """Where `path` is built before it is complete: hidden, beside it, naming its owner."""
    return path.parent / f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.partial"


def sweep_dead_partials(path: Path) -> list[Path]:
    """Remove the partial files and folders of `path` whose process (on this host) is gone."""
    prefix = f".{path.name}.{_HOST}-"
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".partial")):
            continue
        pid = entry.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            remove_quietly(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def remove_quietly(path: Path) -> None:
    """Remove a file or folder we made, ignoring errors (the original one is worth more)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def install_folder(built: Path, target: Path) -> None:
    """Move the finished folder `built` to `target`, replacing what is there (the caller
    checked it may); the old one is moved aside first, then removed."""
    old = partial_path(target) if target.exists() or target.is_symlink() else None
    if old is not None:
        os.replace(target, old)
    os.replace(built, target)
    if old is not None:
        remove_quietly(old)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
