"""A persistent cache of file digests: hashing an unchanged file a second time costs nothing.

The digests known for a file (its sha256 alone, or the whole set `hash_file` computes) are
kept in a SQLite database, keyed by the file's resolved path, with the file's device,
inode, size, modification and change times (ns). A cached digest is used only while all
five still match: the change time moves on every write, even one that sets the
modification time back afterwards (`touch -d`, `rsync -t`), and a file renamed over the
path has another inode.

A digest is stored only when it can be trusted (git's rule for its index):
- the file's stat after hashing equals the one before (nothing wrote to it meanwhile);
- the file's modification and change times are more than `RACY_WINDOW_NS` older than the
  start of hashing: a write within the same timestamp tick as the last one would leave the
  times unchanged, and ticks are coarse (a jiffy on ext4, 2 s on FAT).
So a file hashed right after it was written is cached only on a later hash.

The cache is an aid, never a requirement: when it cannot be reached or used (no home
folder, a read-only or full disk, a database another process keeps locked) hashing goes
on without it, and a corrupt database file is replaced. It uses SQLite's rollback journal
rather than WAL, which needs shared memory and fails on network file systems, where home
folders often live.

Where it lives: `$SDKIT_CACHE_DIR/hashes.sqlite`, else `$XDG_CACHE_HOME/sdkit/hashes.sqlite`,
else `~/.cache/sdkit/hashes.sqlite`; `SDKIT_HASH_CACHE=off` turns it off.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from contextlib import closing
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, TypeVar

CACHE_FILE_NAME = "hashes.sqlite"
SCHEMA_VERSION = 1  # a database of another version is emptied and rebuilt
RACY_WINDOW_NS = 2_000_000_000
BUSY_TIMEOUT_S = 3.0  # waiting for another process's write, which takes milliseconds
_OFF_VALUES = {"off", "0", "false", "no"}
# what a cache that cannot be reached or used raises (RuntimeError: no home folder)
_CACHE_ERRORS = (sqlite3.Error, OSError, ValueError, RuntimeError)
_SCHEMA = """CREATE TABLE files (
    path TEXT PRIMARY KEY,
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    digests TEXT NOT NULL  -- JSON object: digest name -> lowercase hex, or null
)"""

Digests = dict[str, str | None]
Progress = Callable[[int], None]
T = TypeVar("T")


def _int64(value: int) -> int:
    """`value` as SQLite's signed 64-bit integer (some file systems use inode numbers up to 2**64-1)."""
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True)
class FileState:
    """What must not have changed since a digest was stored for it to hold."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str) -> FileState | None:
        """The state of a regular file; None for anything else (a pipe or a device can
        give other bytes at every read whatever its stat says)."""
        try:
            info = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        return cls(_int64(info.st_dev), _int64(info.st_ino), info.st_size,
                   info.st_mtime_ns, info.st_ctime_ns)

    def settled_at(self, started_ns: int) -> bool:
        """Whether the file's last write lies outside the racy window before `started_ns`
        (a time in the future, from a skewed clock, is inside it)."""
        return max(self.mtime_ns, self.ctime_ns) <= started_ns - RACY_WINDOW_NS


def database_path() -> Path | None:
    """The cache's database file; None when SDKIT_HASH_CACHE=off or no home folder is known."""
    if os.environ.get("SDKIT_HASH_CACHE", "").strip().lower() in _OFF_VALUES:
        return None
    if os.environ.get("SDKIT_CACHE_DIR"):
        return Path(os.environ["SDKIT_CACHE_DIR"]) / CACHE_FILE_NAME
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    try:
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: relative is invalid
    except RuntimeError:
        return None
    return base / "sdkit" / CACHE_FILE_NAME


def _connect(database: Path) -> sqlite3.Connection:
    database.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(database, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        _ensure_schema(connection)
    except BaseException:
        connection.close()
        raise
    return connection


def _schema_version(connection: sqlite3.Connection) -> int:
    return connection.execute("PRAGMA user_version").fetchone()[0]


def _ensure_schema(connection: sqlite3.Connection) -> None:
    if _schema_version(connection) == SCHEMA_VERSION:
        return
    connection.execute("BEGIN IMMEDIATE")
    with connection:  # commits, or rolls back on an error
        if _schema_version(connection) != SCHEMA_VERSION:  # another process may have just done it
            connection.execute("DROP TABLE IF EXISTS files")
            connection.execute(_SCHEMA)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _is_corrupt(error: sqlite3.DatabaseError) -> bool:
    # SQLITE_CORRUPT and SQLITE_NOTADB come as the base class; busy, locked, read-only,
    # full and I/O errors as OperationalError, which a new file would not cure
    return type(error) is sqlite3.DatabaseError


def _discard(database: Path) -> None:
    """Delete a database with its journals (a stale journal would be replayed into a new file)."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)


def _with_cache(action: Callable[[sqlite3.Connection], T]) -> T | None:
    """`action(connection)` on the cache; None when the cache is off or fails. A corrupt
    database file is replaced by a new one and the action tried once more."""
    database = database_path()
    if database is None:
        return None
    try:
        try:
            with closing(_connect(database)) as connection:
                return action(connection)
        except sqlite3.DatabaseError as error:
            if not _is_corrupt(error):
                raise
            _discard(database)
            with closing(_connect(database)) as connection:
                return action(connection)
    except _CACHE_ERRORS:
        return None


def _decoded(text: object) -> Digests:
    """A row's digests; none from a value that is not a JSON object."""
    try:
        value = json.loads(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {name: hexdigest for name, hexdigest in value.items()
            if hexdigest is None or isinstance(hexdigest, str)}


def _row(connection: sqlite3.Connection, key: str) -> tuple[FileState, Digests] | None:
    row = connection.execute("SELECT dev, ino, size, mtime_ns, ctime_ns, digests FROM files "
                             "WHERE path = ?", (key,)).fetchone()
    return None if row is None else (FileState(*row[:5]), _decoded(row[5]))


def _cached(connection: sqlite3.Connection, key: str, state: FileState,
            names: Collection[str]) -> Digests | None:
    """The digests `names` of the file at `key` in `state`, when the cache holds them all."""
    row = _row(connection, key)
    if row is None or row[0] != state or not all(name in row[1] for name in names):
        return None
    return {name: row[1][name] for name in names}


def _store(connection: sqlite3.Connection, key: str, state: FileState, digests: Digests) -> None:
    connection.execute("BEGIN IMMEDIATE")
    with connection:
        row = _row(connection, key)
        if row is not None and row[0] == state:
            # the same bytes: keep what another hash of them knew (a full set stays full)
            digests = {**row[1], **digests}
        connection.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (key, *astuple(state), json.dumps(digests, sort_keys=True)))


def remembered_digests(path: str | os.PathLike[str], names: Collection[str],
                       compute: Callable[[], Mapping[str, str | None]],
                       progress: Progress | None = None) -> Digests:
    """The digests `names` of the file at `path`.

    From the cache when it holds them all for the file as it is now (`progress` then gets
    the file's size at once); else `compute()`, which reads the file and reports its own
    progress, and the result is stored when the file held still (see the module notes).
    """
    key = os.path.realpath(path)
    started_ns = time.time_ns()
    before = FileState.of(key)
    if before is not None:
        found = _with_cache(lambda connection: _cached(connection, key, before, names))
        if found is not None:
            if progress is not None and before.size:
                progress(before.size)
            return found
    digests = dict(compute())
    if before is not None and before.settled_at(started_ns) and FileState.of(key) == before:
        _with_cache(lambda connection: _store(connection, key, before, digests))
    return digests


def files_with_digest(name: str, hexdigest: str) -> list[Path]:
    """Files this machine hashed before whose digest `name` was `hexdigest` and which are
    unchanged since (same device, inode, size and times): where an input recorded only by
    its name and hash may still be."""
    needle = f'"{name}": "{hexdigest.lower()}"'

    def matching(connection: sqlite3.Connection) -> list[tuple[Any, ...]]:
        return connection.execute("SELECT path, dev, ino, size, mtime_ns, ctime_ns FROM files "
                                  "WHERE instr(digests, ?) > 0", (needle,)).fetchall()

    found = []
    for path, *state in _with_cache(matching) or []:
        if FileState.of(path) == FileState(*state):
            found.append(Path(path))
    return found
