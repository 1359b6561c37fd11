"""`download`: one entry point for every source, into a folder or into a library.

Sources: `hf:REPO_ID[/PATH][@REVISION]` (a file, a folder or a whole repo), a Hugging Face
file URL, `civitai:MODEL_ID[@VERSION_ID]` or a Civitai model/download URL, any other
http(s) URL. Without a library, files land in the current folder or in `-o PATH`: a
folder when it exists or has no extension, else the file's new name (repos and folders
keep their inner paths under `-o DIR`, default `./<repo name>`). With a library
they grow in `<library>/.sdkit/downloads`, are identified there, and move to the folder
their kind belongs in, with an index row (source, hashes, trigger words).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from sdkit.errors import SdkitError
from sdkit.hub.civitai import (CivitaiClient, CivitaiRef, FileChoice, civitai_ref_from_url,
                               parse_civitai, resolve_civitai)
from sdkit.hub.huggingface import HfSource, hf_source_from_url, parse_hf, resolve_hf
from sdkit.hub.jobstate import remove_job
from sdkit.hub.library.library import Library
from sdkit.hub.library.scan import MODEL_SUFFIXES
from sdkit.hub.names import sanitize_filename
from sdkit.hub.placement import AlreadyPresent, Policy, choose_download_name, place
from sdkit.hub.redact import redact_text, redact_url
from sdkit.hub.transfer import RemoteFile, TransferOptions, Transferred, transfer


@dataclass
class Resolved:
    label: str                 # the source as people read it (no credentials)
    files: list[RemoteFile]
    single: bool               # one file named by the source (not a folder or repo)
    folder_name: str | None    # default output folder for several files


@dataclass
class DownloadOutcome:
    path: Path
    status: Literal["downloaded", "already-present"]
    source: str
    sha256: str | None
    size: int | None
    kind: str | None = None    # library downloads: what identify() said
    family: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)


def resolve_source(source: str, *, choice: FileChoice | None = None,
                   expected_sha256: str | None = None,
                   options: TransferOptions | None = None) -> Resolved:
    """The files a SOURCE string names, with the sizes and hashes the hub publishes."""
    options = options or TransferOptions()
    choice = choice or FileChoice()
    text = source.strip()
    civitai_ref = civitai_ref_from_url(text) if text.startswith(("https://", "http://")) else None
    if choice != FileChoice() and not (text.startswith("civitai:") or civitai_ref):
        raise SdkitError(f"{redact_text(text)}: --file-type, --fp and --format choose among a "
                         "Civitai version's files; this is not a Civitai source")
    if expected_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", expected_sha256):
        raise SdkitError(f"{expected_sha256}: --sha256 needs 64 hex digits")
    if text.startswith("hf:"):
        return _hf(parse_hf(text[3:]))
    if text.startswith("civitai:"):
        return _civitai(parse_civitai(text[8:]), choice, options)
    if civitai_ref is not None:
        return _civitai(civitai_ref, choice, options)
    if text.startswith(("https://", "http://")):
        if (hf := hf_source_from_url(text)) is not None:
            return _hf(hf)
        remote = RemoteFile(url=text, source=redact_url(text),
                            sha256=expected_sha256.lower() if expected_sha256 else None)
        return Resolved(remote.source, [remote], True, None)
    raise SdkitError(f"{redact_text(source)}: unrecognised source (expected hf:OWNER/REPO[/PATH][@REVISION], "
                     "civitai:MODEL_ID[@VERSION_ID], a civitai.com model URL or an https:// URL)")


def _hf(source: HfSource) -> Resolved:
    files, single = resolve_hf(source)
    return Resolved(str(source), files, single, source.repo_id.split("/")[-1])


def _civitai(ref: CivitaiRef, choice: FileChoice, options: TransferOptions) -> Resolved:
    client = CivitaiClient(token=ref.token, policy=options.policy, session=options.session,
                           notify=options.notify)
    return Resolved(str(ref), [resolve_civitai(ref, choice, client)], True, None)


def download(source: str, *, library: Path | None = None, output: Path | None = None,
             choice: FileChoice | None = None, policy: Policy = "refuse",
             family_subfolders: bool | None = None, expected_sha256: str | None = None,
             options: TransferOptions | None = None) -> list[DownloadOutcome]:
    """Download what `source` names; see the module docstring for where files go."""
    options = options or TransferOptions()
    if library is not None and output is not None:
        raise SdkitError("--library and -o/--output exclude each other")
    resolved = resolve_source(source, choice=choice, expected_sha256=expected_sha256, options=options)
    if library is not None:
        with Library.open(library) as lib:
            return _into_library(lib, resolved, policy, family_subfolders, options)
    return [_into_folder(remote, target, policy, options)
            for remote, target in _folder_targets(resolved, output)]


# --- into a plain folder ---------------------------------------------------------------

def _safe_relative(path: str) -> PurePosixPath:
    """A repo path made safe to recreate locally: every component sanitised."""
    parts = [sanitize_filename(p) for p in PurePosixPath(path).parts if p not in ("", ".", "..", "/")]
    return PurePosixPath(*parts)


def _folder_targets(resolved: Resolved, output: Path | None) -> list[tuple[RemoteFile, tuple[Path, str | None]]]:
    """(remote, (folder, explicit name or None)) for each file."""
    if resolved.single:
        if output is None:
            return [(resolved.files[0], (Path.cwd(), None))]
        if output.is_dir() or not output.suffix:  # model files always have an extension
            return [(resolved.files[0], (output, None))]
        return [(resolved.files[0], (output.parent, output.name))]
    base = output if output is not None else Path.cwd() / (resolved.folder_name or "download")
    targets = []
    for remote in resolved.files:
        relative = _safe_relative(remote.relative_path or remote.name or "download")
        targets.append((remote, (base / relative.parent, relative.name)))
    return targets


def _into_folder(remote: RemoteFile, target: tuple[Path, str | None], policy: Policy,
                 options: TransferOptions) -> DownloadOutcome:
    folder, explicit_name = target

    def choose(offered: str, size: int | None) -> str:
        return choose_download_name(folder, explicit_name or offered, sha256=remote.sha256,
                                    size=size if size is not None else remote.size, policy=policy)

    def install(done: Transferred) -> DownloadOutcome:
        placed = place(done.part, folder, done.name, done.sha256, policy=policy, method="move")
        if placed.status == "already-present":
            remove_job(folder, done.name)
        status = "downloaded" if placed.status == "installed" else "already-present"
        return DownloadOutcome(placed.path, status, remote.source, done.sha256, done.size,
                               facts=remote.facts)

    try:
        return transfer(remote, folder, choose, install, options)
    except AlreadyPresent as present:
        return DownloadOutcome(present.path, "already-present", remote.source, remote.sha256,
                               present.path.stat().st_size, facts=remote.facts)


# --- into a library -------------------------------------------------------------------

def _library_files(resolved: Resolved, options: TransferOptions) -> list[RemoteFile]:
    """The weight files of a repo or folder; a diffusers folder does not fit WebUI layouts."""
    if resolved.single:
        return resolved.files
    paths = [r.relative_path or "" for r in resolved.files]
    if any(PurePosixPath(p).name == "model_index.json" for p in paths):
        raise SdkitError(f"{resolved.label}: a diffusers folder does not fit "
                         "a WebUI library; download it with -o DIR instead")
    weights = [r for r in resolved.files if PurePosixPath(r.relative_path or "").suffix.lower() in MODEL_SUFFIXES]
    if not weights:
        raise SdkitError(f"{resolved.label}: no model files to add to a library")
    for remote in resolved.files:
        if remote not in weights:
            options.say(f"{remote.relative_path}: not a model file, left out of the library")
    return weights


def _into_library(lib: Library, resolved: Resolved, policy: Policy,
                  family_subfolders: bool | None, options: TransferOptions) -> list[DownloadOutcome]:
    outcomes = []
    for remote in _library_files(resolved, options):
        present = lib.already_has(remote.sha256)
        if present is not None:
            outcomes.append(DownloadOutcome(lib.root / present.path, "already-present", remote.source,
                                            present.sha256, present.size, present.kind,
                                            present.family, remote.facts))
            continue
        outcomes.append(_download_into_library(lib, remote, policy, family_subfolders, options))
    return outcomes


def _download_into_library(lib: Library, remote: RemoteFile, policy: Policy,
                           family_subfolders: bool | None, options: TransferOptions) -> DownloadOutcome:
    staging = lib.staging

    def choose(offered: str, size: int | None) -> str:
        # the staging folder is private: a clash only means another download of the same name
        return choose_download_name(staging, offered, sha256=None, size=None, policy="rename")

    def install(done: Transferred) -> DownloadOutcome:
        ready = staging / done.name  # identification reads the real suffix, not ".part"
        os.replace(done.part, ready)
        try:
            placement = lib.place_file(ready, method="move", policy=policy,
                                       family_subfolders=family_subfolders, source=remote.source,
                                       facts=remote.facts)
        except SdkitError as exc:
            os.replace(ready, done.part)
            raise SdkitError(f"{exc}; the finished download waits in {staging} and will be reused") from None
        if placement.status == "already-present":
            ready.unlink(missing_ok=True)
            remove_job(staging, done.name)
        status = "downloaded" if placement.status == "installed" else "already-present"
        entry = placement.entry
        return DownloadOutcome(placement.path, status, remote.source, entry.sha256, entry.size,
                               entry.kind, entry.family, remote.facts)

    return transfer(remote, staging, choose, install, options)
