"""The on-disk state of an unfinished download: `<name>.part` plus `<name>.part.json`.

The JSON holds what a later run needs to resume safely: the (redacted) URL, the server's
validator (ETag or Last-Modified, sent back as If-Range), the expected size and sha256,
and the bytes written so far (informational: the .part's real size is what counts).
It never holds a credential. While a process writes a .part it holds an exclusive lock
on it, so a second process refuses instead of interleaving bytes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from sdkit.errors import SdkitError
from sdkit.hub.redact import redact_url

STATE_VERSION = 1
PART_SUFFIX = ".part"
STATE_SUFFIX = ".part.json"


@dataclass
class JobState:
    url: str                      # redacted: no token, no user:password
    name: str                     # final file name in the same folder
    etag: str | None = None
    last_modified: str | None = None
    expected_size: int | None = None
    expected_sha256: str | None = None
    bytes_done: int = 0
    updated: float = 0.0
    version: int = STATE_VERSION

    @property
    def validator(self) -> str | None:
        """What If-Range carries: a strong ETag, else Last-Modified."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified


def part_path(folder: Path, name: str) -> Path:
    return folder / f"{name}{PART_SUFFIX}"


def state_path(folder: Path, name: str) -> Path:
    return folder / f"{name}{STATE_SUFFIX}"


def save_state(folder: Path, state: JobState) -> None:
    """Write the state atomically (temp file + rename), so a kill never leaves half a JSON."""
    state.updated = time.time()
    state.url = redact_url(state.url)  # already redacted by the downloader; never trust it
    target = state_path(folder, state.name)
    temp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
    os.replace(temp, target)


def load_state(path: Path) -> JobState | None:
    """The state in `path`, or None when it is unreadable or from another format version."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != STATE_VERSION:
            return None
        return JobState(**data)
    except (OSError, ValueError, TypeError):
        return None


def find_state(folder: Path, url: str) -> JobState | None:
    """An unfinished download of `url` (redacted form) in `folder`, if one is there."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob(f"*{STATE_SUFFIX}")):
        state = load_state(path)
        if state is not None and state.url == url and state.name == path.name[: -len(STATE_SUFFIX)]:
            return state
    return None


def remove_job(folder: Path, name: str) -> None:
    """Forget an unfinished download: its .part and its state."""
    for path in (part_path(folder, name), state_path(folder, name)):
        path.unlink(missing_ok=True)


def _try_lock(file: IO[bytes]) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        try:
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def open_part(folder: Path, name: str) -> IO[bytes]:
    """Open (creating) the .part for writing at its end, locked against other processes."""
    path = part_path(folder, name)
    file = open(path, "a+b", buffering=0)  # unbuffered: the .part's size is what has arrived
    if not _try_lock(file):
        file.close()
        raise SdkitError(f"{path}: another process is downloading this file right now")
    return file


def is_locked(folder: Path, name: str) -> bool:
    """Whether another process is writing this .part now."""
    path = part_path(folder, name)
    if not path.exists():
        return False
    with open(path, "a+b") as file:
        return not _try_lock(file)
