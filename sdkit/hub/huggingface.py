"""Hugging Face sources: `hf:REPO_ID[/PATH/IN/REPO][@REVISION]` and hub file URLs.

huggingface_hub does what it does well here: it resolves the revision to a commit and
lists the repo's files with their sizes and LFS sha256 (`model_info(files_metadata=True)`),
and builds each file's URL (`hf_hub_url`). The bytes go through sdkit's own downloader,
which resumes across runs and checks the sha256. The endpoint comes from HF_ENDPOINT at
call time and is passed explicitly, so it never depends on when huggingface_hub was
imported; the token is huggingface_hub's own (HF_TOKEN, else the stored login).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from sdkit.errors import SdkitError
from sdkit.hub.http import bearer
from sdkit.hub.redact import redact_text, redact_url
from sdkit.hub.transfer import RemoteFile

DEFAULT_ENDPOINT = "https://huggingface.co"
_REPO_PART = re.compile(r"^[A-Za-z0-9][\w.-]*$")
_FILE_URL = re.compile(r"^/([^/]+)/([^/]+)/(?:resolve|blob)/([^/]+)/(.+)$")


@dataclass(frozen=True)
class HfSource:
    repo_id: str
    path: str = ""              # "" = the whole repo; a file or a folder otherwise
    revision: str | None = None

    def __str__(self) -> str:
        path = f"/{self.path}" if self.path else ""
        revision = f"@{self.revision}" if self.revision else ""
        return f"hf:{self.repo_id}{path}{revision}"


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def parse_hf(spec: str) -> HfSource:
    """`org/name[/path][@revision]` (what follows `hf:`)."""
    body, at, revision = spec.rpartition("@") if "@" in spec else (spec, "", "")
    parts = [p for p in body.strip("/").split("/") if p]
    if len(parts) < 2 or not all(_REPO_PART.match(p) for p in parts[:2]) or (at and not revision):
        raise SdkitError(f"hf:{spec}: expected hf:OWNER/REPO[/PATH][@REVISION]")
    if any(p in (".", "..") for p in parts[2:]):
        raise SdkitError(f"hf:{spec}: a path in a repo cannot contain '.' or '..'")
    return HfSource("/".join(parts[:2]), "/".join(parts[2:]), revision or None)


def hf_source_from_url(url: str) -> HfSource | None:
    """A `…/OWNER/REPO/resolve|blob/REVISION/PATH` URL on the configured endpoint."""
    endpoint, parts = urlsplit(hf_endpoint()), urlsplit(url)
    if parts.netloc.lower() != endpoint.netloc.lower():
        return None
    match = _FILE_URL.match(parts.path)
    if match is None:
        return None
    owner, name, revision, path = (unquote(g) for g in match.groups())
    return parse_hf(f"{owner}/{name}/{path}@{revision}")


def _hub_error(source: HfSource, exc: Exception) -> SdkitError:
    """One line for whatever huggingface_hub raised while listing the repo."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    if isinstance(exc, GatedRepoError):
        return SdkitError(f"{source}: gated repository: accept its terms on the Hub, then set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return SdkitError(f"{source}: repository not found (a private one needs HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return SdkitError(f"{source}: revision {source.revision!r} not found")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return SdkitError(redact_text(f"{source}: the Hub answered HTTP {status} {first}".rstrip()))
    return SdkitError(f"{source}: cannot reach {redact_url(hf_endpoint())} ({exc.__class__.__name__})")


def _is_network_error(exc: Exception) -> bool:
    # huggingface_hub talks through httpx (2.x) or requests (older); both raise their own
    # transport errors, recognised by module so neither has to be imported here
    return type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _repo_info(source: HfSource, endpoint: str, token: str | None) -> Any:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        return api.model_info(source.repo_id, revision=source.revision, files_metadata=True)
    except HfHubHTTPError as exc:
        raise _hub_error(source, exc) from None
    except Exception as exc:
        if _is_network_error(exc):
            raise _hub_error(source, exc) from None
        raise


def _selected(source: HfSource, siblings: list[Any], commit: str) -> list[Any]:
    if not source.path:
        return siblings
    exact = [s for s in siblings if s.rfilename == source.path]
    if exact:
        return exact
    prefix = source.path.rstrip("/") + "/"
    inside = [s for s in siblings if s.rfilename.startswith(prefix)]
    if not inside:
        raise SdkitError(f"{source}: no file or folder {source.path!r} in the repo at {commit[:12]}")
    return inside


def resolve_hf(source: HfSource) -> tuple[list[RemoteFile], bool]:
    """The files `source` names, pinned to the commit the revision points at now.

    Returns (files, is_single_file).
    """
    from huggingface_hub import get_token, hf_hub_url

    endpoint, token = hf_endpoint(), get_token()
    info = _repo_info(source, endpoint, token)
    commit = info.sha or source.revision or "main"
    siblings = _selected(source, list(info.siblings or []), commit)
    if not siblings:
        raise SdkitError(f"{source}: the repo holds no files")
    files = []
    for sibling in siblings:
        lfs = sibling.lfs
        files.append(RemoteFile(
            url=hf_hub_url(source.repo_id, sibling.rfilename, revision=commit, endpoint=endpoint),
            source=f"hf:{source.repo_id}/{sibling.rfilename}@{commit}",
            name=sibling.rfilename.rsplit("/", 1)[-1],
            relative_path=sibling.rfilename,
            size=lfs.size if lfs is not None else sibling.size,
            sha256=lfs.sha256.lower() if lfs is not None and lfs.sha256 else None,
            headers=bearer(token),
            token_env="HF_TOKEN",
            facts={"hf_repo": source.repo_id, "hf_revision": commit, "hf_path": sibling.rfilename}))
    single = bool(source.path) and len(files) == 1 and files[0].relative_path == source.path
    return files, single
