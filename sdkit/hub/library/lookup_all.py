"""`library lookup` over a whole library: Civitai's answer for every file, kept where
A1111 / Forge and their extensions look for it.

Per file: the model-version JSON goes to `<stem>.civitai.info`, the index row takes its
facts (as a one-file lookup does), the keys `<stem>.json` lacks are added (activation
text, preferred weight, sd version; a key the user has, even empty, is kept), and a
preview is downloaded when none is there and the version has a still image.

Resumable and polite: a file whose `.civitai.info` already lists its sha256 is answered
from that file, and one Civitai did not know is remembered (by sha256) in its index row;
neither is asked again unless `again`. Requests go one at a time, `pause` seconds apart,
with the client's retries (Retry-After honoured). Work done is kept file by file, so a
killed run loses nothing and the same command carries on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdkit.errors import SdkitError
from sdkit.hub.civitai import CivitaiClient, version_facts
from sdkit.hub.jobstate import remove_job
from sdkit.hub.library import sidecars
from sdkit.hub.library.index import Entry
from sdkit.hub.library.library import Library
from sdkit.hub.library.lookup import current_sha256, store_answer
from sdkit.hub.transfer import RemoteFile, TransferOptions, Transferred, transfer
from sdkit.io.output_path import install_file

UNKNOWN_KEY = "civitai_unknown_sha256"  # in an index row's hub facts: Civitai said 404 for these bytes


@dataclass
class LibraryLookup:
    files: int = 0                 # indexed files on disk
    asked: int = 0                 # by-hash requests sent
    from_info: int = 0             # answered by a `.civitai.info` already there
    skipped_unknown: int = 0       # Civitai did not know them on an earlier run
    found: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # sidecar files written
    problems: list[str] = field(default_factory=list)


@dataclass
class LookupSettings:
    pause: float = 1.0             # seconds between two API requests
    previews: bool = True
    again: bool = False            # ask again for files answered or unknown before
    transfer: TransferOptions | None = None
    progress: Callable[[Path], None] | None = None


def lookup_library(library: Library, client: CivitaiClient, settings: LookupSettings | None = None) -> LibraryLookup:
    """Look every indexed file up on Civitai and write its sidecars (see the module)."""
    settings = settings or LookupSettings()
    report = LibraryLookup()
    for entry in library.index.entries():
        path = library.root / entry.path
        if not path.is_file():
            continue
        report.files += 1
        if settings.progress is not None:
            settings.progress(path)
        _look_up_one(library, client, entry, path, settings, report)
    return report


def _look_up_one(library: Library, client: CivitaiClient, entry: Entry, path: Path,
                 settings: LookupSettings, report: LibraryLookup) -> None:
    sha256 = current_sha256(path, library, entry.path)
    version = None if settings.again else _saved_answer(path, sha256)
    if version is not None:
        report.from_info += 1
    elif not settings.again and (entry.hub or {}).get(UNKNOWN_KEY) == sha256:
        report.skipped_unknown += 1
        return
    else:
        if report.asked and settings.pause > 0:
            client.policy.sleep(settings.pause)
        report.asked += 1
        version = client.by_hash(sha256)
        if version is None:
            _remember_unknown(library, entry, sha256)
            report.unknown.append(entry.path)
            return
        _wrote(report, sidecars.write_json(sidecars.civitai_info_path(path), version))
    report.found.append(entry.path)
    stored = store_answer(library, path, entry.path, sha256, version_facts(version))
    _fill_user_metadata(path, version, stored, report)
    if settings.previews:
        _fetch_preview(path, version, client, settings.transfer, report)


def _saved_answer(path: Path, sha256: str) -> dict[str, Any] | None:
    """The `.civitai.info` beside the file, when it describes these very bytes."""
    info = sidecars.read_sidecars(path).civitai_info
    return info if sidecars.info_matches(info, sha256) else None


def _remember_unknown(library: Library, entry: Entry, sha256: str) -> None:
    if entry.sha256 != sha256:
        return  # the row describes older bytes; the next scan renews it
    entry.hub = {**(entry.hub or {}), UNKNOWN_KEY: sha256}
    library.update_entry(entry)


def _wrote(report: LibraryLookup, path: Path) -> None:
    report.written.append(str(path))


def _fill_user_metadata(path: Path, version: dict[str, Any], entry: Entry, report: LibraryLookup) -> None:
    found = sidecars.read_sidecars(path)
    target = sidecars.user_metadata_path(path)
    if target.exists() and found.user_metadata is None:
        report.problems.append(f"{target}: not readable JSON; left as it is")
        return
    merged = sidecars.fill_missing(found.user_metadata, sidecars.offered_user_metadata(version, entry.kind, entry.family))
    if merged is not None:
        _wrote(report, sidecars.write_json(target, merged))


def _fetch_preview(path: Path, version: dict[str, Any], client: CivitaiClient,
                   options: TransferOptions | None, report: LibraryLookup) -> None:
    url = sidecars.preview_image_url(version)
    if url is None or sidecars.find_preview(path) is not None:
        return
    try:
        _wrote(report, download_preview(path, url, client, options))
    except SdkitError as exc:  # a missing picture must not stop the lookup of a library
        report.problems.append(f"{path}: no preview: {exc}")


def download_preview(model: Path, url: str, client: CivitaiClient, options: TransferOptions | None) -> Path:
    """Download an image beside `model` as `<stem>.preview.<ext>`, the extension from the
    image's own first bytes (Civitai serves JPEG, PNG and WebP alike)."""
    remote = RemoteFile(url=url, source=url, headers=client.headers_for(url))
    name = f"{model.stem}.preview-download"

    def install(done: Transferred) -> Path:
        with open(done.part, "rb") as image:
            extension = sidecars.image_extension(image.read(16))
        if extension is None:
            remove_job(model.parent, name)
            raise SdkitError(f"{remote.source}: not a PNG, JPEG, WebP or GIF image")
        target = sidecars.preview_path(model, extension)
        install_file(done.part, target, replace=False)
        return target

    return transfer(remote, model.parent, lambda offered, size: name, install, options)

