"""Local stand-ins for the Hugging Face Hub, Civitai and a plain file host.

Each is a real HTTP/1.1 server on 127.0.0.1 (port 0) in a thread, so the real clients
(huggingface_hub, requests) talk to them over sockets. The Hub imitation follows the
contract huggingface_hub relies on: `resolve` answers with X-Repo-Commit, ETag /
X-Linked-Etag / X-Linked-Size, LFS files redirect to a second origin, `/api/models/...`
(with `?blobs=true` sizes and LFS sha256), tree listings, errors with X-Error-Code.
Civitai's imitation serves the v1 API and the download redirect to signed storage.
Every server records the requests it saw (with headers) for the tests to inspect.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Blob:
    """A file a server hands out, with the misbehaviours a test can switch on."""

    data: bytes
    etag: str | None = None
    content_disposition: str | None = None
    content_type: str = "application/octet-stream"
    ignore_range: bool = False                            # always 200 with the whole file
    drop_at: list[int] = field(default_factory=list)      # absolute offsets; one per response
    corrupt: bool = False                                 # flip one byte of what is sent
    stall_at: int | None = None                           # pause there until `resume` is set
    resume: threading.Event = field(default_factory=threading.Event)
    framing: str = "length"          # "length": Content-Length; "close": until the connection
                                     # closes; "chunked": Transfer-Encoding: chunked
    per_connection: int | None = None  # send at most this many bytes, then hang up
    trickle_s: float | None = None     # send one byte, then wait this long, and so on

    def body(self) -> bytes:
        if not self.corrupt or not self.data:
            return self.data
        middle = len(self.data) // 2
        return self.data[:middle] + bytes([self.data[middle] ^ 0xFF]) + self.data[middle + 1:]


Route = Callable[["Handler"], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # exact Content-Length, keep-alive, as the clients expect
    server: "FakeServer"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def _dispatch(self) -> None:
        self.server.seen.append(Seen(self.command, self.path, dict(self.headers.items())))
        self.server.route(self)

    do_GET = do_HEAD = _dispatch

    @property
    def url_path(self) -> str:
        return unquote(urlsplit(self.path).path)

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reply_json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        self.reply(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

    def serve_blob(self, blob: Blob, headers: dict[str, str] | None = None) -> None:
        """Bytes with Range / If-Range support and the blob's misbehaviours."""
        data, total = blob.body(), len(blob.data)
        start, status = 0, 200
        wanted = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        if wanted and not blob.ignore_range and (if_range is None or if_range == blob.etag):
            start = int(wanted.group(1))
            if start >= total:
                self.reply(416, b"", {"Content-Range": f"bytes */{total}"})
                return
            status = 206
        out = {"Content-Type": blob.content_type, "Accept-Ranges": "bytes",
               "Content-Length": str(total - start), **(headers or {})}
        if blob.framing != "length":
            del out["Content-Length"]
            out.update({"Connection": "close"} if blob.framing == "close" else
                       {"Transfer-Encoding": "chunked"})
        if blob.etag:
            out["ETag"] = blob.etag
        if blob.content_disposition:
            out["Content-Disposition"] = blob.content_disposition
        if status == 206:
            out["Content-Range"] = f"bytes {start}-{total - 1}/{total}"
        self.send_response(status)
        for key, value in out.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if blob.framing != "length" or blob.per_connection is not None or blob.trickle_s is not None:
            self._send_hostile(blob, data[start:])
            return
        if blob.stall_at is not None and start < blob.stall_at < total:
            self.wfile.write(data[start:blob.stall_at])
            self.wfile.flush()
            blob.resume.wait(timeout=20)
            start = blob.stall_at
        drop = next((d for d in blob.drop_at if d > start), None)
        if drop is not None:
            blob.drop_at.remove(drop)
            self.wfile.write(data[start:drop])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # the peer sees a short body
            return
        self.wfile.write(data[start:])


    def _send_hostile(self, blob: Blob, body: bytes) -> None:
        """The body as framed, cut short or trickled, as the blob asks; then hang up."""
        if blob.per_connection is not None:
            body = body[:blob.per_connection]
        pieces = [body[i:i + 1] for i in range(len(body))] if blob.trickle_s else [body]
        try:
            for piece in pieces:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if blob.framing == "chunked" else piece)
                self.wfile.flush()
                if blob.trickle_s:
                    time.sleep(blob.trickle_s)
            if blob.framing == "chunked" and blob.per_connection is None:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except OSError:  # the client hung up: what these servers are for
            pass
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, route: Route) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.route = route
        self.seen: list[Seen] = []
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up mid-body is part of the tests, not news

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def authorizations(self) -> list[str]:
        return [s.headers["Authorization"] for s in self.seen if "Authorization" in s.headers]


# --- a plain file host -------------------------------------------------------------------

class FileHost:
    """`/files/<name>` serves `blobs[name]`; `/status/<code>` answers with that status."""

    def __init__(self) -> None:
        self.blobs: dict[str, Blob] = {}
        self.statuses: dict[str, list[tuple[int, dict[str, str]]]] = {}  # name -> replies to send first
        self.server = FakeServer(self._route)

    def url(self, name: str) -> str:
        return f"{self.server.origin}/files/{quote(name)}"

    def _route(self, handler: Handler) -> None:
        name = handler.url_path.removeprefix("/files/")
        queued = self.statuses.get(name)
        if queued:
            status, headers = queued.pop(0)
            handler.reply(status, b"busy", headers)
        elif name in self.blobs:
            handler.serve_blob(self.blobs[name])
        else:
            handler.reply(404, b"no such file")


# --- Hugging Face Hub ----------------------------------------------------------------------

def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    lfs: set[str]
    commit: str
    gated_token: str | None = None  # when set, resolve needs `Authorization: Bearer <it>`


class FakeHub:
    """The Hub origin plus an LFS storage origin (a different port, so a different host)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.storage = FileHost()
        self.server = FakeServer(self._route)

    @property
    def endpoint(self) -> str:
        return self.server.origin

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, lfs_over: int = 1024,
                 gated_token: str | None = None) -> Repo:
        commit = hashlib.sha1(repo_id.encode() + b"".join(sorted(files.values()))).hexdigest()
        lfs = {path for path, data in files.items() if len(data) > lfs_over}
        repo = Repo(files, lfs, commit, gated_token)
        self.repos[repo_id] = repo
        for path in lfs:
            sha = hashlib.sha256(files[path]).hexdigest()
            self.storage.blobs[sha] = Blob(files[path], etag=f'"{sha}"')
        return repo

    def lfs_blob(self, repo_id: str, path: str) -> Blob:
        return self.storage.blobs[hashlib.sha256(self.repos[repo_id].files[path]).hexdigest()]

    def _route(self, handler: Handler) -> None:
        path = handler.url_path
        if path.startswith("/api/models/"):
            self._api(handler, path.removeprefix("/api/models/"))
            return
        match = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if match is None:
            handler.reply(404, b"", {"X-Error-Code": "EntryNotFound"})
            return
        self._resolve(handler, match.group(1), match.group(2), match.group(3))

    def _repo_at(self, handler: Handler, repo_id: str, revision: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            handler.reply(404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return None
        if revision not in ("main", repo.commit):
            handler.reply(404, b"", {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
            return None
        return repo

    def _entry(self, repo: Repo, path: str, with_blobs: bool) -> dict[str, Any]:
        data = repo.files[path]
        entry: dict[str, Any] = {"rfilename": path}
        if with_blobs:
            entry.update(size=len(data), blobId=git_blob_sha1(data))
            if path in repo.lfs:
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                "pointerSize": 132}
        return entry

    def _api(self, handler: Handler, rest: str) -> None:
        parts = rest.split("/")
        repo_id, tail = "/".join(parts[:2]), parts[2:]
        if tail[:1] == ["tree"]:
            self._tree(handler, repo_id, tail[1])
            return
        revision = tail[1] if tail[:1] == ["revision"] else "main"
        repo = self._repo_at(handler, repo_id, revision)
        if repo is None:
            return
        blobs = handler.query.get("blobs") == ["True"] or handler.query.get("blobs") == ["true"]
        handler.reply_json(200, {"id": repo_id, "modelId": repo_id, "sha": repo.commit,
                                 "private": False, "gated": bool(repo.gated_token),
                                 "siblings": [self._entry(repo, p, blobs) for p in sorted(repo.files)]})

    def _tree(self, handler: Handler, repo_id: str, revision: str) -> None:
        repo = self._repo_at(handler, repo_id, revision)
        if repo is None:
            return
        listing: list[dict[str, Any]] = []
        folders = sorted({p.rsplit("/", 1)[0] for p in repo.files if "/" in p})
        listing += [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in folders]
        for path in sorted(repo.files):
            data = repo.files[path]
            item: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if path in repo.lfs:
                item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 132}
            listing.append(item)
        handler.reply_json(200, listing)

    def _resolve(self, handler: Handler, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo_at(handler, repo_id, revision)
        if repo is None:
            return
        if repo.gated_token and handler.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            handler.reply(403, b"", {"X-Error-Code": "GatedRepo",
                                     "X-Error-Message": "Access to this repo is restricted"})
            return
        if path not in repo.files:
            handler.reply(404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
            return
        data, commit = repo.files[path], {"X-Repo-Commit": repo.commit}
        if path in repo.lfs:
            sha = hashlib.sha256(data).hexdigest()
            handler.reply(302, b"", {**commit, "Location": self.storage.url(sha),
                                     "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
            return
        handler.serve_blob(Blob(data, etag=f'"{git_blob_sha1(data)}"'), commit)


# --- Civitai ---------------------------------------------------------------------------------

@dataclass
class CivitaiFile:
    id: int
    name: str
    data: bytes
    type: str = "Model"
    format: str = "SafeTensor"
    fp: str = "fp16"
    primary: bool = False
    published_sha256: str | None = None  # what the API claims; default: the real one


@dataclass
class CivitaiVersion:
    id: int
    model_id: int
    name: str
    files: list[CivitaiFile]
    base_model: str = "SD 1.5"
    trained_words: list[str] = field(default_factory=list)
    login_required: bool = False
    early_access_until: str | None = None
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (name, bytes) on the storage host
    image_type: str = "image"


class FakeCivitai:
    """The v1 API and `/api/download/models/<vid>` (302 to a storage origin)."""

    def __init__(self) -> None:
        self.models: dict[int, tuple[str, str, list[CivitaiVersion]]] = {}
        self.valid_token: str | None = None
        self.api_statuses: list[tuple[int, dict[str, str]]] = []  # replies to send first
        self.storage = FileHost()
        self.server = FakeServer(self._route)

    @property
    def endpoint(self) -> str:
        return self.server.origin

    def add_model(self, model_id: int, name: str, model_type: str, versions: list[CivitaiVersion]) -> None:
        self.models[model_id] = (name, model_type, versions)
        for version in versions:
            for image_name, image in version.images:
                self.storage.blobs[image_name] = Blob(image, etag=f'"{hashlib.md5(image).hexdigest()}"',
                                                      content_type="image/jpeg")
            for file in version.files:
                self.storage.blobs[f"{file.id}"] = Blob(
                    file.data, etag=f'"{hashlib.md5(file.data).hexdigest()}"',
                    content_disposition=f'attachment; filename="{file.name}"')

    def _version(self, version_id: int) -> tuple[str, str, CivitaiVersion] | None:
        for name, model_type, versions in self.models.values():
            for version in versions:
                if version.id == version_id:
                    return name, model_type, version
        return None

    def _file_json(self, version: CivitaiVersion, file: CivitaiFile) -> dict[str, Any]:
        sha = file.published_sha256 or hashlib.sha256(file.data).hexdigest()
        out = {"id": file.id, "name": file.name, "type": file.type, "sizeKB": len(file.data) / 1024,
               "metadata": {"format": file.format, "fp": file.fp, "size": "pruned"},
               "hashes": {"SHA256": sha.upper(), "AutoV2": sha[:10].upper()},
               "downloadUrl": f"{self.endpoint}/api/download/models/{version.id}"
                              f"?type={quote(file.type)}&format={file.format}&fp={file.fp}"}
        if file.primary:
            out["primary"] = True
        return out

    def _version_json(self, name: str, model_type: str, version: CivitaiVersion) -> dict[str, Any]:
        return {"id": version.id, "modelId": version.model_id, "name": version.name,
                "baseModel": version.base_model, "trainedWords": version.trained_words,
                "model": {"name": name, "type": model_type, "nsfw": False},
                "files": [self._file_json(version, f) for f in version.files],
                "images": [{"url": self.storage.url(image_name), "type": version.image_type, "nsfwLevel": 1}
                           for image_name, _ in version.images],
                "downloadUrl": f"{self.endpoint}/api/download/models/{version.id}"}

    def _route(self, handler: Handler) -> None:
        path = handler.url_path
        if path.startswith("/api/v1/") and self.api_statuses:
            status, headers = self.api_statuses.pop(0)
            handler.reply_json(status, {"error": "Too Many Requests"}, headers)
        elif match := re.match(r"^/api/v1/models/(\d+)$", path):
            self._model(handler, int(match.group(1)))
        elif match := re.match(r"^/api/v1/model-versions/by-hash/([0-9A-Fa-f]+)$", path):
            self._by_hash(handler, match.group(1).upper())
        elif match := re.match(r"^/api/v1/model-versions/(\d+)$", path):
            found = self._version(int(match.group(1)))
            if found is None:
                handler.reply_json(404, {"error": f"No version with id {match.group(1)}"})
            else:
                handler.reply_json(200, self._version_json(*found))
        elif match := re.match(r"^/api/download/models/(\d+)$", path):
            self._download(handler, int(match.group(1)))
        else:
            handler.reply_json(404, {"error": "Not found"})

    def _model(self, handler: Handler, model_id: int) -> None:
        if model_id not in self.models:
            handler.reply_json(404, {"error": f"No model with id {model_id}"})
            return
        name, model_type, versions = self.models[model_id]
        handler.reply_json(200, {"id": model_id, "name": name, "type": model_type,
                                 "modelVersions": [self._version_json(name, model_type, v) for v in versions]})

    def _by_hash(self, handler: Handler, wanted: str) -> None:
        for name, model_type, versions in self.models.values():
            for version in versions:
                for file in version.files:
                    if hashlib.sha256(file.data).hexdigest().upper() == wanted:
                        handler.reply_json(200, self._version_json(name, model_type, version))
                        return
        handler.reply_json(404, {"error": "Model not found"})

    def _download(self, handler: Handler, version_id: int) -> None:
        found = self._version(version_id)
        if found is None:
            handler.reply_json(404, {"error": "File not found"})
            return
        version = found[2]
        authorized = self.valid_token is not None and \
            handler.headers.get("Authorization") == f"Bearer {self.valid_token}"
        if version.login_required and not authorized:
            handler.reply_json(401, {"error": "Unauthorized", "message": "The creator of this asset "
                                     "requires you to be logged in to download it"})
            return
        if version.early_access_until and not authorized:
            handler.reply_json(403, {"error": "Early Access", "deadline": version.early_access_until,
                                     "message": "This asset is in Early Access."})
            return
        wanted_type = handler.query.get("type", [None])[0]
        wanted_fp = handler.query.get("fp", [None])[0]
        files = [f for f in version.files if (wanted_type in (None, f.type)) and (wanted_fp in (None, f.fp))]
        if not files:
            handler.reply_json(404, {"error": "File not found"})
            return
        file = next((f for f in files if f.primary), files[0])
        handler.reply(302, b"", {"Location": f"{self.storage.url(str(file.id))}?sig=signed",
                                 "Cache-Control": "no-store"})
