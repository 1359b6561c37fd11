"""The library index: one SQLite file, `<library>/.sdkit/index.sqlite`.

One row per model file: relative path, size, mtime_ns, hashes (sha256, AutoV2, AutoV3,
A1111 legacy), what identify() says (kind, family, adapter type, the part in words and the
release), what decided the family (the weights, or Civitai's base model where the weights
fit several families), notes for people, where it came from (a hub source, never a
credential), trigger words and Civitai facts, when it was added.

Columns added after the first version (part, release, family_source, notes) are added to
an older index when it is opened; its rows read them as empty until the next scan fills
them in (a scan re-identifies such rows from their headers without hashing again).
WAL journal + a busy timeout + `BEGIN IMMEDIATE` transactions let several processes (two
downloads at once, a scan beside them) write without losing each other's rows. Everything
here can be rebuilt from disk by a scan, except sources and Civitai facts.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from sdkit.errors import SdkitError
from sdkit.hub.redact import redact_text

SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 60.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    autov2 TEXT,
    autov3 TEXT,
    legacy TEXT,
    kind TEXT NOT NULL,
    family TEXT NOT NULL,
    adapter_type TEXT,
    source TEXT,
    trigger_words TEXT NOT NULL DEFAULT '[]',
    hub TEXT,
    added_at TEXT NOT NULL,
    indexed_at TEXT NOT NULL,
    part TEXT,
    release TEXT,
    family_source TEXT,
    notes TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files(sha256);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# columns of later schema versions, added in place to an index made before them
_ADDED_COLUMNS = {"part": "TEXT", "release": "TEXT", "family_source": "TEXT",
                  "notes": "TEXT NOT NULL DEFAULT '[]'"}


class IndexDamaged(SdkitError):
    """The index file exists but SQLite cannot read it."""


@dataclass
class Entry:
    path: str                    # relative to the library root, with '/' separators
    size: int
    mtime_ns: int
    sha256: str | None
    autov2: str | None
    autov3: str | None
    legacy: str | None
    kind: str
    family: str
    adapter_type: str | None
    source: str | None
    trigger_words: list[str] = field(default_factory=list)
    hub: dict[str, Any] | None = None  # what the hub said: Civitai ids and names, HF repo…
    added_at: str = ""
    indexed_at: str = ""
    part: str | None = None      # identify()'s words: "FLUX.1-dev diffusion model"; None: not yet
    release: str | None = None   # "FLUX.1-dev", from the weights or from Civitai's base model
    family_source: str | None = None  # "weights" | "civitai"; None: no one family decided
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_COLUMNS = [f.name for f in fields(Entry)]


def _to_row(entry: Entry) -> tuple[Any, ...]:
    values = entry.to_json()
    values["source"] = redact_text(entry.source) if entry.source else None  # never a credential
    values["trigger_words"] = json.dumps(entry.trigger_words)
    values["hub"] = json.dumps(entry.hub) if entry.hub is not None else None
    values["notes"] = json.dumps(entry.notes)
    return tuple(values[c] for c in _COLUMNS)


def _from_row(row: sqlite3.Row) -> Entry:
    values = dict(zip(_COLUMNS, row))
    values["trigger_words"] = json.loads(values["trigger_words"] or "[]")
    values["hub"] = json.loads(values["hub"]) if values["hub"] else None
    values["notes"] = json.loads(values["notes"] or "[]")
    return Entry(**values)


def _index_error(path: Path, exc: sqlite3.Error) -> SdkitError:
    """Damage (rebuild it) told apart from a busy or unwritable index (try again)."""
    text = str(exc)
    if type(exc) is sqlite3.DatabaseError or any(
            word in text for word in ("not a database", "malformed", "corrupt")):
        return IndexDamaged(f"{path}: the library index is damaged ({text}); "
                            "run `sdkit library scan` on the library to rebuild it")
    return SdkitError(f"{path}: cannot use the library index ({text})")


class Index:
    """A connection to one library's index; use `with index.transaction():` to write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            with self.transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self._add_missing_columns()
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self.close()
            raise _index_error(path, exc) from None
        except SdkitError:
            self.close()
            raise

    def _add_missing_columns(self) -> None:
        present = {row[1] for row in self.db.execute("PRAGMA table_info(files)")}
        for name, declaration in _ADDED_COLUMNS.items():
            if name not in present:
                self.db.execute(f"ALTER TABLE files ADD COLUMN {name} {declaration}")

    def close(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
            self.db = None  # type: ignore[assignment]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE: take the write lock up front, so two writers queue, never deadlock."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _index_error(self.path, exc) from None

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Entry]:
        try:
            return [_from_row(row) for row in self.db.execute(sql, params)]
        except sqlite3.Error as exc:
            raise _index_error(self.path, exc) from None

    # --- rows ---------------------------------------------------------------------

    def put(self, entry: Entry) -> None:
        placeholders = ", ".join("?" for _ in _COLUMNS)
        self.db.execute(f"INSERT OR REPLACE INTO files ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
                        _to_row(entry))

    def remove(self, path: str) -> None:
        self.db.execute("DELETE FROM files WHERE path = ?", (path,))

    def get(self, path: str) -> Entry | None:
        found = self._query(f"SELECT {', '.join(_COLUMNS)} FROM files WHERE path = ?", (path,))
        return found[0] if found else None

    def entries(self, kind: str | None = None, family: str | None = None) -> list[Entry]:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM files WHERE (? IS NULL OR kind = ?) " \
              "AND (? IS NULL OR family = ?) ORDER BY path"
        return self._query(sql, (kind, kind, family, family))

    def undescribed(self) -> list[Entry]:
        """Rows written before the index kept the part (filled in by the next scan)."""
        return self._query(f"SELECT {', '.join(_COLUMNS)} FROM files WHERE part IS NULL ORDER BY path")

    def by_sha256(self, sha256: str) -> list[Entry]:
        return self._query(f"SELECT {', '.join(_COLUMNS)} FROM files WHERE sha256 = ? ORDER BY path",
                           (sha256.lower(),))

    def find(self, query: str) -> list[Entry]:
        """By sha256 prefix, AutoV2, AutoV3 or legacy hash, or by a substring of the path."""
        text = query.strip().lower()
        sql = (f"SELECT {', '.join(_COLUMNS)} FROM files WHERE sha256 LIKE ? ESCAPE '\\' "
               "OR autov2 = ? OR autov3 = ? OR legacy = ? OR lower(path) LIKE ? ESCAPE '\\' "
               "ORDER BY path")
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return self._query(sql, (f"{escaped}%", text, text, text, f"%{escaped}%"))

    def duplicates(self) -> list[list[Entry]]:
        """Groups of rows with the same sha256, largest waste first."""
        sql = (f"SELECT {', '.join(_COLUMNS)} FROM files WHERE sha256 IN "
               "(SELECT sha256 FROM files WHERE sha256 IS NOT NULL GROUP BY sha256 HAVING count(*) > 1) "
               "ORDER BY size DESC, sha256, path")
        groups: dict[str, list[Entry]] = {}
        for entry in self._query(sql):
            groups.setdefault(entry.sha256 or "", []).append(entry)
        return list(groups.values())

    # --- settings -----------------------------------------------------------------

    def setting(self, key: str) -> str | None:
        try:
            row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            raise _index_error(self.path, exc) from None
        return row[0] if row else None

    def set_setting(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))
