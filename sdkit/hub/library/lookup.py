"""`lookup`: ask Civitai what a local file is, by its sha256, and remember the answer.

Civitai's `baseModel` is kept with the other facts and settles the family of a file whose
weights fit several families (or none sdkit knows); see `identified.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdkit.errors import SdkitError
from sdkit.hub.civitai import CivitaiClient, version_facts
from sdkit.hub.library.identified import identify_file, settle_family
from sdkit.hub.library.index import Entry
from sdkit.hub.library.library import Library, describe_file, hub_fields
from sdkit.io import hash_file


@dataclass
class LookupResult:
    path: Path
    sha256: str
    facts: dict[str, Any]   # model and version names, base model, trigger words, ids
    stored: bool            # written to the library index
    family: str = "unknown"  # the family the file is filed under after the lookup
    notes: list[str] = field(default_factory=list)  # e.g. Civitai and the weights disagree


def current_sha256(path: Path, library: Library | None, relative: str | None) -> str:
    """The indexed sha256 when the file is unchanged since indexing, else a fresh one."""
    entry = library.index.get(relative) if library is not None and relative else None
    stat = path.stat()
    if entry is not None and entry.sha256 and (entry.size, entry.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
        return entry.sha256
    sha256 = hash_file(path).sha256
    if sha256 is None:
        raise SdkitError(f"{path}: a folder has no single hash to look up")
    return sha256


def lookup_file(path: Path, library: Library | None, client: CivitaiClient) -> LookupResult:
    """Civitai's facts about `path`; stored in `library`'s index when the file is in it."""
    if not path.is_file():
        raise SdkitError(f"{path}: no such file")
    relative = library.relative(path) if library is not None else None
    sha256 = current_sha256(path, library, relative)
    version = client.by_hash(sha256)
    if version is None:
        raise SdkitError(f"{path}: Civitai does not know this file (sha256 {sha256})")
    facts = version_facts(version)
    if library is None or relative is None:
        return LookupResult(path, sha256, facts, stored=False)
    entry = store_answer(library, path, relative, sha256, facts)
    return LookupResult(path, sha256, facts, stored=True, family=entry.family, notes=entry.notes)


def store_answer(library: Library, path: Path, relative: str, sha256: str, facts: dict[str, Any]) -> Entry:
    """Keep what Civitai said about the file in its index row, and settle its family."""
    previous = library.index.get(relative)
    entry = previous if previous is not None and previous.sha256 == sha256 else \
        describe_file(library.root, path, previous=previous)
    entry.trigger_words, entry.hub = hub_fields(facts)
    entry.source = entry.source or f"civitai:{facts['civitai_model_id']}@{facts['civitai_version_id']}"
    settle_family(entry, identify_file(path))  # a header read: the weights first, then Civitai
    library.update_entry(entry)
    return entry
