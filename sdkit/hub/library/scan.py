"""Indexing a folder tree that exists already, and checking it later.

A scan is incremental: a file whose size and mtime_ns match its row is not read again;
only new and changed files are hashed and identified (the report counts them). Rows
written before the index kept the part are identified again from their headers, without
hashing. Rows of files gone from disk are dropped, and a file that merely moved (same
sha256) keeps what hubs said about it. A damaged index is set aside and rebuilt from disk.

A file in a folder the WebUI reads for another kind (a LoRA in the checkpoint folder) is
reported as misplaced; the legacy folder names a WebUI still reads (ComfyUI's
`models/unet`, `models/clip`) count as right.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from sdkit.hub.library.folders import outside
from sdkit.hub.library.identified import identify_file, settle_family
from sdkit.hub.library.index import Entry, Index, IndexDamaged
from sdkit.hub.library.layouts import Layout, detect_layout
from sdkit.hub.library.library import Library, describe_file, index_key, index_path
from sdkit.io import hash_file
from sdkit.io.safetensors_reader import SAFETENSORS_SUFFIXES
from sdkit.io.torch_checkpoint import PICKLE_SUFFIXES

MODEL_SUFFIXES = frozenset(SAFETENSORS_SUFFIXES) | frozenset(PICKLE_SUFFIXES) | {".gguf"}


@dataclass
class ScanReport:
    files: int = 0        # model files found on disk
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    rehashed: int = 0     # files read and hashed in this scan
    reidentified: int = 0  # older rows given their part (headers read, not hashed)
    rebuilt: bool = False  # the index was damaged and has been rebuilt
    layout: str | None = None
    misplaced: list[dict[str, str]] = field(default_factory=list)  # {path, kind, folder}
    folders: list[dict[str, object]] = field(default_factory=list)  # configured folders: {kind, path, is_default, origin}


@dataclass
class VerifyReport:
    checked: int = 0
    rehashed: int = 0
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.changed and not self.missing


def model_files(root: Path) -> Iterator[Path]:
    """Model files under `root`, skipping hidden folders (the index's own among them)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix.lower() in MODEL_SUFFIXES and not name.startswith("."):
                yield path


def library_files(library: Library) -> Iterator[Path]:
    """The model files under the root and in the configured folders outside it."""
    yield from model_files(library.root)
    for folder in outside(library.root, library.folders):
        if folder.is_dir():
            yield from model_files(folder)


def open_for_scan(root: Path) -> tuple[Library, bool]:
    """(library, rebuilt): the index opened, or created in a WebUI root, or set aside and
    recreated when damaged. A folder that is neither a library nor a WebUI root is refused."""
    root = root.resolve()
    if not index_path(root).is_file():
        return Library.open(root), False
    rebuilt = False
    try:
        index = Index(index_path(root))
    except IndexDamaged:
        _set_aside(index_path(root))
        index, rebuilt = Index(index_path(root)), True
    library = Library(root, index)
    if library.layout is None:
        layout = detect_layout(root)
        if layout is not None:
            library.close()
            library = Library.init(root, layout.name)
    return library, rebuilt


def _set_aside(path: Path) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        damaged = path.with_name(path.name + suffix)
        if damaged.exists():
            os.replace(damaged, path.with_name(f"{path.name}.damaged-{stamp}{suffix}"))


def scan_library(library: Library, progress: Callable[[Path], None] | None = None) -> ScanReport:
    """Bring the index in line with the files on disk."""
    report = ScanReport(layout=library.layout.name if library.layout else None,
                        folders=[folder.to_json() for folder in library.folders])
    known = {entry.path: entry for entry in library.index.entries()}
    on_disk = {index_key(library.root, p): p for p in library_files(library)}
    report.files = len(on_disk)
    gone = [known[p] for p in known if p not in on_disk]
    moved_from = {entry.sha256: entry for entry in gone if entry.sha256}
    for relative, path in on_disk.items():
        previous = known.get(relative)
        stat = path.stat()
        if previous and previous.size == stat.st_size and previous.mtime_ns == stat.st_mtime_ns:
            report.unchanged += 1
            continue
        if progress is not None:
            progress(path)
        identified = identify_file(path)
        entry = describe_file(library.root, path, previous=previous, identified=identified)
        report.rehashed += 1
        if previous is None and entry.sha256 in moved_from:
            _inherit(entry, moved_from[entry.sha256])
            settle_family(entry, identified)  # what Civitai said moved with it
        report.added += previous is None
        report.updated += previous is not None
        library.update_entry(entry)
    with library.index.transaction():
        for entry in gone:
            library.index.remove(entry.path)
    report.removed = len(gone)
    report.reidentified = _describe_older_rows(library)
    report.misplaced = misplaced_files(library)
    return report


def _describe_older_rows(library: Library) -> int:
    """Give rows from before the index kept the part their part, release and family."""
    rows = library.index.undescribed()
    for entry in rows:
        settle_family(entry, identify_file(library.root / entry.path))
        library.update_entry(entry)
    return len(rows)


def misplaced_files(library: Library) -> list[dict[str, str]]:
    """Indexed files lying in a folder the WebUI reads for other kinds."""
    layout = library.layout
    if layout is None:
        return []
    return [{"path": entry.path, "kind": entry.kind, "folder": _home(library, layout, entry.kind)}
            for entry in library.index.entries()
            if entry.kind != "unknown" and _elsewhere(library, entry)]


def _elsewhere(library: Library, entry: Entry) -> bool:
    kinds = library.kinds_read_from(entry.path)
    return bool(kinds) and entry.kind not in kinds


def _home(library: Library, layout: Layout, kind: str) -> str:
    configured = [str(f.path) for f in library.folders if f.kind == kind]
    own = list(layout.folders_of_kind(kind)) or [layout.folders["unknown"]]
    return (own + configured)[0]


def _inherit(entry: Entry, moved: Entry) -> None:
    entry.source, entry.trigger_words, entry.hub = moved.source, moved.trigger_words, moved.hub
    entry.added_at = moved.added_at


def verify_library(library: Library, *, full: bool = False,
                   progress: Callable[[Path], None] | None = None) -> VerifyReport:
    """Which indexed files changed or vanished since they were indexed (read-only).

    A file whose size and mtime match is trusted unless `full`; a touched file with the
    same sha256 counts as unchanged.
    """
    report = VerifyReport()
    for entry in library.index.entries():
        report.checked += 1
        path = library.root / entry.path
        if not path.is_file():
            report.missing.append(entry.path)
            continue
        stat = path.stat()
        if not full and stat.st_size == entry.size and stat.st_mtime_ns == entry.mtime_ns:
            continue
        if progress is not None:
            progress(path)
        report.rehashed += 1
        if stat.st_size != entry.size or hash_file(path).sha256 != entry.sha256:
            report.changed.append(entry.path)
    return report

