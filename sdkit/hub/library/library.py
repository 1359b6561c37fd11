"""A model library: a folder tree in a WebUI layout plus its index.

Files are placed by what they *are* (identify() on their content), never by their name:
a LoRA called `model.ckpt` still lands in the LoRA folder. The layout is recorded in the
index when the library is created, or detected from an existing tree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from sdkit.errors import SdkitError, with_article
from sdkit.hub.library.folders import ModelFolder, configured_folders
from sdkit.hub.library.identified import (
    Identified,
    base_model_of,
    identify_file,
    identify_strictly,
    settle_family,
    settled_family,
)
from sdkit.hub.library.index import Entry, Index
from sdkit.hub.library.layouts import LAYOUTS, Layout, detect_layout
from sdkit.hub.placement import Method, Policy, place
from sdkit.io import Hashes, hash_file

INDEX_FOLDER = ".sdkit"
INDEX_FILE = "index.sqlite"
STAGING_FOLDER = "downloads"
FOLDERS_SETTING = "model_folders"
HUB_FACT_KEYS = ("civitai_model_id", "civitai_version_id", "civitai_file_id", "model_name",
                 "model_type", "version_name", "base_model", "hf_repo", "hf_revision", "hf_path")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def index_path(root: Path) -> Path:
    return root / INDEX_FOLDER / INDEX_FILE


def index_key(root: Path, path: Path) -> str:
    """How the index names a file: relative to the root with '/' separators, or by its
    absolute path for a file in a configured folder outside the root."""
    try:
        return PurePosixPath(path.relative_to(root)).as_posix()
    except ValueError:
        return Path(os.path.abspath(path)).as_posix()


def find_library_root(start: Path) -> Path | None:
    """The nearest folder at or above `start` that holds a library index."""
    start = start.resolve()
    for folder in (start, *start.parents):
        if index_path(folder).is_file():
            return folder
    return None


def model_folders_of(root: Path) -> list[ModelFolder]:
    """The configured model folders of the library or WebUI folder `root` (none for any
    other folder); nothing is created."""
    root = root.resolve()
    if index_path(root).is_file():
        with Library.open_existing(root) as library:
            return library.folders
    layout = detect_layout(root)
    return configured_folders(root, layout.name, []) if layout else []


def hub_fields(facts: dict[str, Any] | None) -> tuple[list[str], dict[str, Any] | None]:
    """(trigger words, hub facts) to store from what a hub said about a file."""
    if not facts:
        return [], None
    kept = {k: facts[k] for k in HUB_FACT_KEYS if facts.get(k) is not None}
    return list(facts.get("trigger_words") or []), kept or None


def describe_file(root: Path, path: Path, *, hashes: Hashes | None = None,
                  identified: Identified | None = None, previous: Entry | None = None,
                  facts: dict[str, Any] | None = None) -> Entry:
    """A fresh index row for `path` (hashed and identified unless given), keeping what
    `previous` knew from hubs when the bytes did not change, or taking what a hub said
    now (`facts`); the family is settled from both."""
    stat = path.stat()
    hashes = hashes or hash_file(path)
    same_bytes = previous is not None and previous.sha256 == hashes.sha256
    kept = previous if same_bytes else None
    entry = Entry(
        path=index_key(root, path), size=stat.st_size,
        mtime_ns=stat.st_mtime_ns, sha256=hashes.sha256, autov2=hashes.autov2,
        autov3=hashes.autov3, legacy=hashes.legacy, kind="unknown", family="unknown",
        adapter_type=None, source=kept.source if kept else None,
        trigger_words=kept.trigger_words if kept else [], hub=kept.hub if kept else None,
        added_at=previous.added_at if previous else now_iso(), indexed_at=now_iso())
    trigger_words, hub = hub_fields(facts)
    entry.trigger_words = trigger_words or entry.trigger_words
    entry.hub = hub or entry.hub
    settle_family(entry, identified or identify_file(path))
    return entry


def _not_a_library(root: Path) -> str:
    return (f"{root}: not an sdkit library (no {INDEX_FOLDER}/{INDEX_FILE}) nor an A1111/Forge "
            "or ComfyUI folder; create one with `sdkit library init DIR --layout "
            "a1111|comfyui|invokeai-like`")


@dataclass
class Placement:
    """Where a file ended up in the library, and whether it was already there."""

    path: Path
    entry: Entry
    status: Literal["installed", "already-present"]


class Library:
    def __init__(self, root: Path, index: Index) -> None:
        self.root = root
        self.index = index
        name = index.setting("layout")
        self.layout: Layout | None = LAYOUTS.get(name) if name else None
        self.family_subfolders = index.setting("family_subfolders") == "1"

    # --- opening ------------------------------------------------------------------

    @classmethod
    def init(cls, root: Path, layout_name: str, *, family_subfolders: bool = False) -> "Library":
        """Create the layout's folders and the index (again: a no-op for the same layout)."""
        layout = LAYOUTS.get(layout_name)
        if layout is None:
            raise SdkitError(f"{layout_name}: unknown layout (choose from {', '.join(LAYOUTS)})")
        root = root.resolve()
        library = cls(root, Index(index_path(root)))
        if library.layout is not None and library.layout.name != layout.name:
            raise SdkitError(f"{root}: already {with_article(library.layout.name)} library")
        for folder in layout.all_folders():
            (root / folder).mkdir(parents=True, exist_ok=True)
        with library.index.transaction():
            library.index.set_setting("layout", layout.name)
            library.index.set_setting("family_subfolders", "1" if family_subfolders else "0")
        library.layout, library.family_subfolders = layout, family_subfolders
        return library

    @classmethod
    def open(cls, root: Path) -> "Library":
        """An existing library to write to; a WebUI root without an index gets one (its
        layout detected). Any other folder is refused: only `init` makes a library."""
        return cls._open(root, index_webui_root=True)

    @classmethod
    def open_existing(cls, root: Path) -> "Library":
        """An existing library to read: nothing is created, not even in a WebUI root."""
        return cls._open(root, index_webui_root=False)

    @classmethod
    def _open(cls, root: Path, *, index_webui_root: bool) -> "Library":
        root = root.resolve()
        if index_path(root).is_file():
            return cls(root, Index(index_path(root)))
        layout = detect_layout(root)
        if layout is None:
            raise SdkitError(_not_a_library(root))
        if index_webui_root:
            return cls.init(root, layout.name)
        raise SdkitError(f"{root}: {with_article(layout.name)} folder that sdkit has not indexed yet; "
                         f"index it with `sdkit library scan {root}`")

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @cached_property
    def folders(self) -> list[ModelFolder]:
        """The model folders the WebUI is told about (its yaml / webui-user, and those given
        to sdkit), read when first needed."""
        stored = [ModelFolder.from_json(value) for value in json.loads(self.index.setting(FOLDERS_SETTING) or "[]")]
        return configured_folders(self.root, self.layout.name if self.layout else None, stored)

    def remember_folders(self, folders: list[ModelFolder]) -> None:
        """Keep folders given to sdkit (A1111 flags, a ComfyUI yaml elsewhere) for later commands."""
        stored = json.loads(self.index.setting(FOLDERS_SETTING) or "[]")
        for folder in folders:
            if folder.to_json() not in stored:
                stored.append(folder.to_json())
        with self.index.transaction():
            self.index.set_setting(FOLDERS_SETTING, json.dumps(stored))
        self.__dict__.pop("folders", None)

    def kinds_read_from(self, key: str) -> set[str]:
        """The kinds the WebUI reads from where the indexed file `key` lies (its layout's
        folders and the configured ones)."""
        kinds = self.layout.kinds_read_from(key) if self.layout else set()
        path = self.root / key
        for folder in self.folders:
            if path.is_relative_to(folder.path):
                kinds.add(folder.kind)
        return kinds

    @property
    def staging(self) -> Path:
        """Where downloads grow before they are identified and placed (same filesystem)."""
        return self.root / INDEX_FOLDER / STAGING_FOLDER

    def relative(self, path: Path) -> str | None:
        """The index key of `path` (relative to the root, or absolute in a configured
        folder outside it), or None when it lies outside the library."""
        path = path.resolve()
        if path.is_relative_to(self.root) or any(path.is_relative_to(f.path) for f in self.folders):
            return index_key(self.root, path)
        return None

    def _placement_folder(self, kind: str, family: str, subfolders: bool) -> Path:
        """Where a new file of this kind goes: the WebUI's first folder for it (a ComfyUI
        `is_default` folder comes before its own), else the layout's."""
        layout = self._layout_or_refuse()
        first = next((f.path for f in self.folders if f.is_default and f.kind == kind), None)
        if first is None or layout.family_first:
            return self.root / layout.folder_for(kind, family, subfolders)
        relative = layout.folder_for(kind, family, subfolders)
        return first / relative[len(layout.folders.get(kind, "")):].lstrip("/")

    def _layout_or_refuse(self) -> Layout:
        if self.layout is None:
            raise SdkitError(f"{self.root}: the library has no layout yet; set one with "
                             "`sdkit library init DIR --layout a1111|comfyui|invokeai-like`")
        return self.layout

    # --- placing files ------------------------------------------------------------

    def already_has(self, sha256: str | None) -> Entry | None:
        """An indexed file with these bytes that is still on disk."""
        if not sha256:
            return None
        for entry in self.index.by_sha256(sha256):
            if (self.root / entry.path).is_file():
                return entry
        return None

    def place_file(self, path: Path, *, method: Method, policy: Policy,
                   family_subfolders: bool | None = None, name: str | None = None,
                   source: str | None = None, facts: dict[str, Any] | None = None,
                   identified: Identified | None = None) -> Placement:
        """Identify `path` (unless `identified` says what it is), put it in its kind's
        folder (its family's, with family subfolders) and index it."""
        self._layout_or_refuse()
        hashes = hash_file(path)
        present = self.already_has(hashes.sha256)
        if present is not None:
            return Placement(self.root / present.path, present, "already-present")
        identified = identified or identify_file(path)
        subfolders = self.family_subfolders if family_subfolders is None else family_subfolders
        family = settled_family(identified, base_model_of(hub_fields(facts)[1])).filing_family
        folder = self._placement_folder(identified.kind, family, subfolders)
        old_relative = self.relative(path) if method == "move" else None
        placed = place(path, folder, name or path.name, hashes.sha256 or "", policy=policy, method=method)
        entry = describe_file(self.root, placed.path, hashes=hashes, identified=identified,
                              previous=self.index.get(self.relative(placed.path) or ""), facts=facts)
        entry.source = source or entry.source
        with self.index.transaction():
            if old_relative is not None and old_relative != entry.path:
                self.index.remove(old_relative)
            self.index.put(entry)
        return Placement(placed.path, entry, placed.status)

    def add(self, paths: list[Path], *, method: Method = "copy", policy: Policy = "refuse",
            family_subfolders: bool | None = None) -> list[Placement]:
        """Put existing files into the library where their identified kind belongs.

        Every file is read first: one that is not a model file (what `sdkit inspect`
        refuses) stops the whole call before anything is copied or indexed.
        """
        identified = []
        for path in paths:
            if not path.is_file():
                raise SdkitError(f"{path}: no such file")
            identified.append(identify_strictly(path))
        return [self.place_file(path, method=method, policy=policy, identified=found,
                                family_subfolders=family_subfolders)
                for path, found in zip(paths, identified)]

    def update_entry(self, entry: Entry) -> None:
        with self.index.transaction():
            self.index.put(entry)
