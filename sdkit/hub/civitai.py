"""Civitai sources through its REST API v1, with `requests`.

Accepted: `civitai:MODEL_ID[@VERSION_ID]`, a model page URL
(`/models/<id>[/slug][?modelVersionId=<vid>]`), and a download URL
(`/api/download/models/<vid>`), on civitai.com or on CIVITAI_ENDPOINT. Metadata comes from
`/api/v1/models/{id}` and `/api/v1/model-versions/{id}`; what a local file is, from
`/api/v1/model-versions/by-hash/{sha256}`. The token (CIVITAI_TOKEN, or a `token=` in a
pasted URL) travels only as an `Authorization: Bearer` header to the Civitai host; the
download's redirect to signed storage drops it, and nothing ever writes it down.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import requests

from sdkit.errors import SdkitError
from sdkit.hub.http import HttpRefused, RetryPolicy, bearer, get_json, query_token
from sdkit.hub.transfer import RemoteFile

DEFAULT_ENDPOINT = "https://civitai.com"
_CIVITAI_HOSTS = ("civitai.com", "www.civitai.com")
_MODEL_PAGE = re.compile(r"^/models/(\d+)(?:/[^/]*)?/?$")
_DOWNLOAD_PATH = re.compile(r"^/api/download/models/(\d+)/?$")
_VERSION_API = re.compile(r"^/api/v1/model-versions/(\d+)/?$")


def civitai_endpoint() -> str:
    return (os.environ.get("CIVITAI_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


@dataclass(frozen=True)
class CivitaiRef:
    model_id: int | None
    version_id: int | None
    token: str | None = None  # from a pasted URL; never shown

    def __str__(self) -> str:
        if self.model_id is None:
            return f"civitai:version {self.version_id}"
        return f"civitai:{self.model_id}" + (f"@{self.version_id}" if self.version_id else "")


@dataclass(frozen=True)
class FileChoice:
    """Which of a version's files to take; None everywhere = the primary file."""

    file_type: str | None = None   # Model, Pruned Model, VAE, Config, …
    fp: str | None = None          # fp16, fp32, bf16, …
    format: str | None = None      # SafeTensor, PickleTensor, GGUF, …

    def matches(self, file: dict[str, Any]) -> bool:
        metadata = file.get("metadata") or {}
        wanted = ((self.file_type, file.get("type")), (self.fp, metadata.get("fp")),
                  (self.format, metadata.get("format")))
        return all(want is None or str(have or "").lower() == want.lower() for want, have in wanted)

    def __str__(self) -> str:
        words = [f"{k}={v}" for k, v in (("type", self.file_type), ("fp", self.fp),
                                          ("format", self.format)) if v]
        return ", ".join(words) or "any"


def parse_civitai(spec: str) -> CivitaiRef:
    """`MODEL_ID[@VERSION_ID]` (what follows `civitai:`)."""
    match = re.fullmatch(r"(\d+)(?:@(\d+))?", spec.strip())
    if match is None:
        raise SdkitError(f"civitai:{spec}: expected civitai:MODEL_ID[@VERSION_ID] (numbers)")
    version = int(match.group(2)) if match.group(2) else None
    return CivitaiRef(int(match.group(1)), version)


def civitai_ref_from_url(url: str) -> CivitaiRef | None:
    """A model page, download or version-API URL on civitai.com or CIVITAI_ENDPOINT."""
    parts = urlsplit(url)
    hosts = _CIVITAI_HOSTS + (urlsplit(civitai_endpoint()).netloc.lower(),)
    if parts.netloc.lower() not in hosts:
        return None
    token = query_token(url)
    if match := _MODEL_PAGE.match(parts.path):
        version = parse_qs(parts.query).get("modelVersionId", [None])[0]
        return CivitaiRef(int(match.group(1)), int(version) if version and version.isdigit() else None, token)
    for pattern in (_DOWNLOAD_PATH, _VERSION_API):
        if match := pattern.match(parts.path):
            return CivitaiRef(None, int(match.group(1)), token)
    return None


class CivitaiClient:
    """The few v1 API calls sdkit needs, with retries and one-line errors."""

    def __init__(self, *, token: str | None = None, policy: RetryPolicy | None = None,
                 session: requests.Session | None = None,
                 notify: Callable[[str], None] | None = None) -> None:
        self.endpoint = civitai_endpoint()
        self.token = token or os.environ.get("CIVITAI_TOKEN") or None
        self.policy = policy or RetryPolicy()
        self.session = session or requests.Session()
        self.notify = notify

    def headers_for(self, url: str) -> dict[str, str]:
        """The token goes to the Civitai host only, never to a third party's URL."""
        host = urlsplit(url).netloc.lower()
        ours = host in _CIVITAI_HOSTS + (urlsplit(self.endpoint).netloc.lower(),)
        return bearer(self.token) if ours else {}

    def _get(self, path: str, what: str) -> Any:
        url = f"{self.endpoint}{path}"
        return get_json(self.session, url, headers=self.headers_for(url), what=what,
                        policy=self.policy, token_env="CIVITAI_TOKEN", notify=self.notify)

    def version(self, ref: CivitaiRef) -> dict[str, Any]:
        """The version `ref` names (the model's newest published one when none is given)."""
        if ref.version_id is not None:
            version = self._get(f"/api/v1/model-versions/{ref.version_id}", str(ref))
            if ref.model_id is not None and version.get("modelId") not in (None, ref.model_id):
                raise SdkitError(f"{ref}: version {ref.version_id} belongs to model {version.get('modelId')}")
            return version
        model = self._get(f"/api/v1/models/{ref.model_id}", str(ref))
        versions = model.get("modelVersions") or []
        if not versions:
            raise SdkitError(f"{ref}: the model has no published version")
        version = dict(versions[0])
        version.setdefault("modelId", model.get("id"))
        version.setdefault("model", {"name": model.get("name"), "type": model.get("type")})
        return version

    def by_hash(self, sha256: str) -> dict[str, Any] | None:
        """The version a file with this hash belongs to, or None when Civitai does not know it."""
        try:
            return self._get(f"/api/v1/model-versions/by-hash/{sha256.upper()}", f"civitai lookup {sha256[:12]}")
        except HttpRefused as exc:
            if exc.status == 404:
                return None
            raise


def _describe(file: dict[str, Any]) -> str:
    metadata = file.get("metadata") or {}
    return f"{file.get('name')} (type {file.get('type')}, {metadata.get('format')}, {metadata.get('fp')})"


def choose_file(version: dict[str, Any], choice: FileChoice, what: str) -> dict[str, Any]:
    files = version.get("files") or []
    if not files:
        raise SdkitError(f"{what}: this version offers no files (archived?)")
    candidates = [f for f in files if choice.matches(f)]
    if not candidates:
        offered = "; ".join(_describe(f) for f in files)
        raise SdkitError(f"{what}: no file matches {choice}; offered: {offered}")
    primary = [f for f in candidates if f.get("primary")]
    return (primary or candidates)[0]


def version_facts(version: dict[str, Any]) -> dict[str, Any]:
    """What the index keeps about a Civitai version."""
    model = version.get("model") or {}
    return {
        "civitai_model_id": version.get("modelId"),
        "civitai_version_id": version.get("id"),
        "model_name": model.get("name"),
        "model_type": model.get("type"),
        "version_name": version.get("name"),
        "base_model": version.get("baseModel"),
        "trigger_words": [str(w) for w in version.get("trainedWords") or []],
    }


def resolve_civitai(ref: CivitaiRef, choice: FileChoice, client: CivitaiClient) -> RemoteFile:
    """The one file of `ref` that `choice` picks, with its published sha256."""
    version = client.version(ref)
    file = choose_file(version, choice, str(ref))
    version_id = version.get("id") or ref.version_id
    url = file.get("downloadUrl") or f"{client.endpoint}/api/download/models/{version_id}"
    sha256 = (file.get("hashes") or {}).get("SHA256")
    model_id = version.get("modelId") or ref.model_id
    return RemoteFile(
        url=url, source=f"civitai:{model_id}@{version_id}", name=file.get("name"),
        sha256=sha256.lower() if sha256 else None, headers=client.headers_for(url),
        token_env="CIVITAI_TOKEN", facts=version_facts(version) | {"civitai_file_id": file.get("id")})
