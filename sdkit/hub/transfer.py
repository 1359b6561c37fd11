"""The one downloader behind every source: resumable, verified, never a partial result.

Bytes stream into `<name>.part` beside the target while a sha256 runs over them; a
`<name>.part.json` (see jobstate.py) lets a later run pick up where a killed one stopped.
A resumed request says `Range: bytes=N-` with `If-Range: <validator>`: a 206 appends, a
200 (the server ignored the range, or the file changed) restarts from zero, a 416 means
the part is already complete or stale. Dropped connections, timeouts, 429 and 5xx are
retried with exponential backoff (Retry-After honoured); each retry resumes, within the
bounds of the RetryPolicy (failed tries, tries in all, a speed floor, `max_time`). No more
bytes are read than the hub lists: a longer body or Content-Length discards the part.
The result is checked against the size and sha256 the hub publishes; a mismatch discards
the part. Only then does `install` run, while the part is still locked against other
processes.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Protocol, TypeVar

import requests
import urllib3

from sdkit.errors import SdkitError
from sdkit.hub.http import (NETWORK_ERRORS, RetryableError, RetryBudget, RetryPolicy,
                            check_response, request_refused)
from sdkit.hub.jobstate import (JobState, find_state, is_locked, open_part, part_path,
                                remove_job, save_state, state_path)
from sdkit.hub.names import filename_from_content_disposition, filename_from_url, sanitize_filename
from sdkit.hub.redact import redact_text, redact_url

_STREAM_ERRORS = NETWORK_ERRORS + (requests.exceptions.ChunkedEncodingError,
                                   urllib3.exceptions.HTTPError)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_MIB = 1 << 20
Result = TypeVar("Result")


@dataclass
class RemoteFile:
    """One file a hub offers. `headers` may carry credentials and are never persisted."""

    url: str
    source: str                    # for people and the index: "hf:org/repo/file@sha", a redacted URL…
    name: str | None = None        # the hub's file name; None: from the response
    relative_path: str | None = None  # inside a multi-file download (a repo folder)
    size: int | None = None        # exact size when the hub publishes it
    sha256: str | None = None      # lower-case hex when the hub publishes it
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    token_env: str | None = None   # the variable that would carry a token, for 401 advice
    facts: dict[str, Any] = field(default_factory=dict)  # trigger words, base model, ids

    def __post_init__(self) -> None:
        self.source = redact_text(self.source)  # shown in every message and stored in indexes


class TransferProgress(Protocol):
    def begin(self, name: str, total: int | None, done: int) -> None: ...
    def update(self, done: int) -> None: ...
    def end(self) -> None: ...


@dataclass
class TransferOptions:
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    chunk_bytes: int = _MIB
    state_every_bytes: int = 16 * _MIB
    progress: TransferProgress | None = None
    notify: Callable[[str], None] | None = None
    session: requests.Session | None = None

    def say(self, message: str) -> None:
        if self.notify is not None:
            self.notify(message)


@dataclass
class Transferred:
    """A complete, verified .part, handed to `install` while still locked."""

    part: Path
    name: str
    sha256: str
    size: int


ChooseName = Callable[[str, "int | None"], str]   # (offered safe name, size) -> name in folder
Install = Callable[[Transferred], Result]


def transfer(remote: RemoteFile, folder: Path, choose_name: ChooseName,
             install: Install[Result], options: TransferOptions | None = None) -> Result:
    """Download `remote` into `folder` (resuming any earlier attempt) and install it.

    `choose_name` settles the file name once it is known (it may refuse by raising);
    `install` moves the verified part into place and returns what the caller wants.
    """
    folder.mkdir(parents=True, exist_ok=True)
    job = _Transfer(remote, folder, choose_name, options or TransferOptions())
    try:
        done = job.run()
        result = install(done)
        state_path(folder, done.name).unlink(missing_ok=True)
        return result
    except Exception:
        job.discard_if_empty()  # a refusal before the first byte leaves nothing behind
        raise
    finally:
        job.close()


def _chunks(response: requests.Response, size: int, limit: int | None) -> Iterator[bytes]:
    """The body as it arrives: `read1` hands over every byte received before a drop,
    where iter_content would lose the last partial chunk. With a `limit` (the bytes still
    expected) no read asks for more than one byte past it, so an overlong body is seen
    without being read."""
    read1 = getattr(response.raw, "read1", None)  # urllib3 >= 2
    if read1 is None:
        yield from response.iter_content(size)
        return
    while True:
        wanted = size if limit is None else max(1, min(size, limit + 1))
        chunk = read1(wanted, decode_content=True)
        if not chunk:
            return
        if limit is not None:
            limit -= len(chunk)
        yield chunk


class _SpeedFloor:
    """Cuts a connection that trickles: under `min_speed` bytes/s over `window` seconds."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.min_speed, self.window = policy.min_speed, policy.speed_window
        self.since, self.bytes = time.monotonic(), 0

    def passed(self, count: int) -> None:
        self.bytes += count
        elapsed = time.monotonic() - self.since
        if elapsed < self.window:
            return
        if self.bytes < self.min_speed * elapsed:
            raise RetryableError(f"the server sent {self.bytes} bytes in {elapsed:.0f} s, "
                                 f"under {self.min_speed:g} bytes/s")
        self.since, self.bytes = time.monotonic(), 0


def _mib(count: int) -> str:
    return f"{count / _MIB:.1f} MiB"


class _Transfer:
    def __init__(self, remote: RemoteFile, folder: Path, choose_name: ChooseName,
                 options: TransferOptions) -> None:
        self.remote, self.folder, self.options = remote, folder, options
        self.choose_name = choose_name
        self.own_session = options.session is None
        self.session = options.session or requests.Session()
        self.state: JobState | None = None
        self.file: IO[bytes] | None = None
        self.hasher = hashlib.sha256()
        self.done = 0
        previous = find_state(folder, redact_url(remote.url))
        if previous is not None and self._still_valid(previous):
            self._resume(previous)
        elif previous is not None and not is_locked(folder, previous.name):
            remove_job(folder, previous.name)  # the hub now describes other bytes
        if self.state is None and remote.name:
            self._start(choose_name(sanitize_filename(remote.name), remote.size))

    # --- job lifecycle ------------------------------------------------------------

    def _still_valid(self, previous: JobState) -> bool:
        """An earlier attempt fits only if the hub still describes the same bytes."""
        sha, size = self.remote.sha256, self.remote.size
        return ((sha is None or previous.expected_sha256 in (None, sha))
                and (size is None or previous.expected_size in (None, size)))

    def _start(self, name: str) -> None:
        self.file = open_part(self.folder, name)  # first: another process's part stays untouched
        self.state = JobState(url=redact_url(self.remote.url), name=name,
                              expected_size=self.remote.size, expected_sha256=self.remote.sha256)
        self._restart_from_zero()

    def _resume(self, previous: JobState) -> None:
        self.file = open_part(self.folder, previous.name)
        self.state = previous
        self.state.expected_sha256 = previous.expected_sha256 or self.remote.sha256
        self.state.expected_size = previous.expected_size or self.remote.size
        path = part_path(self.folder, previous.name)
        with open(path, "rb") as existing:  # the hash must cover the bytes already there
            while chunk := existing.read(self.options.chunk_bytes * 8):
                self.hasher.update(chunk)
                self.done += len(chunk)
        self.options.say(f"{previous.name}: resuming at {_mib(self.done)}")

    def _restart_from_zero(self) -> None:
        assert self.file is not None and self.state is not None
        self.file.truncate(0)
        self.hasher = hashlib.sha256()
        self.done = 0
        self.state.bytes_done = 0
        save_state(self.folder, self.state)

    def close(self) -> None:
        if self.own_session:
            self.session.close()
        if self.file is not None:
            if not self.file.closed and self.state is not None:
                self.file.flush()
                self.state.bytes_done = self.done
                if state_path(self.folder, self.state.name).exists():
                    save_state(self.folder, self.state)
            self.file.close()

    def discard_if_empty(self) -> None:
        if self.file is not None and self.done == 0:
            self._discard()

    def _discard(self) -> None:
        if self.state is not None:
            remove_job(self.folder, self.state.name)

    # --- the retry loop -----------------------------------------------------------

    def run(self) -> Transferred:
        policy = self.options.policy
        budget = RetryBudget(policy)
        while True:
            before = self.done
            try:
                if self._attempt():
                    return self._verified()
                continue
            except _STREAM_ERRORS as exc:
                error = RetryableError(f"connection lost ({exc.__class__.__name__})")
            except RetryableError as exc:
                error = exc
            wait, give_up = budget.spend(self.done - before, error.retry_after)
            if give_up is not None:
                raise SdkitError(f"{self.remote.source}: {error}; {give_up} at {_mib(self.done)} "
                                 "(run the same command again to resume)")
            self.options.say(f"{self.remote.source}: {error} at {_mib(self.done)}; "
                             f"retrying in {wait:.1f} s")
            policy.sleep(wait)

    def _request_headers(self) -> dict[str, str]:
        headers = dict(self.remote.headers)
        headers["Accept-Encoding"] = "identity"  # ranges must address the file's own bytes
        if self.done > 0 and self.state is not None:
            validator = self.state.validator
            if validator:
                headers["If-Range"] = validator
            if validator or self.state.expected_sha256:  # without either, mixing is undetectable
                headers["Range"] = f"bytes={self.done}-"
            else:
                self._restart_from_zero()
        return headers

    def _attempt(self) -> bool:
        """One request; True when the part is complete, False to ask again at once."""
        timeout = self.options.policy.read_timeout()
        headers = self._request_headers()
        try:
            response = self.session.get(self.remote.url, headers=headers, stream=True,
                                        timeout=(timeout, timeout))
        except _STREAM_ERRORS:
            raise
        except requests.RequestException as exc:  # a bad URL or redirect: no retry helps
            raise request_refused(self.remote.source, exc) from None
        with response:
            if response.status_code == 416:
                return self._range_not_satisfiable(response)
            check_response(response, what=self.remote.source,
                           token_sent="Authorization" in self.remote.headers,
                           token_env=self.remote.token_env)
            if self.state is None:
                self._start(self._name_from(response))
            self._refuse_web_page(response)
            total = self._accept(response)
            self._stream(response, total)
        return True

    # --- reading one response -----------------------------------------------------

    def _name_from(self, response: requests.Response) -> str:
        offered = (filename_from_content_disposition(response.headers.get("Content-Disposition"))
                   or filename_from_url(response.url) or filename_from_url(self.remote.url))
        length = response.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() and response.status_code == 200 else None
        return self.choose_name(sanitize_filename(offered or ""), size)

    def _refuse_web_page(self, response: requests.Response) -> None:
        content_type = response.headers.get("Content-Type", "").lower()
        assert self.state is not None
        if content_type.startswith("text/html") and not self.state.name.lower().endswith((".html", ".htm")):
            self.discard_if_empty()
            raise SdkitError(f"{self.remote.source}: the server sent a web page instead of the "
                             "file (a login or consent page?)")

    def _accept(self, response: requests.Response) -> int | None:
        """Position the part for this response; returns the file's total size if known."""
        assert self.state is not None
        self.state.etag = response.headers.get("ETag") or self.state.etag
        self.state.last_modified = response.headers.get("Last-Modified") or self.state.last_modified
        if response.status_code == 206:
            total = self._check_content_range(response)
        elif response.status_code == 200:
            if self.done > 0:
                self.options.say(f"{self.state.name}: the server sent the whole file instead of "
                                 f"the rest; restarting from zero")
                self._restart_from_zero()
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise SdkitError(f"{self.remote.source}: unexpected HTTP {response.status_code}")
        self._check_total(total)
        self._check_body_length(response)
        save_state(self.folder, self.state)
        return total

    def _check_content_range(self, response: requests.Response) -> int | None:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match is None or int(match.group(1)) != self.done:
            self._restart_from_zero()
            raise RetryableError("the server answered a different range; restarting from zero")
        return None if match.group(3) == "*" else int(match.group(3))

    def _check_total(self, total: int | None) -> None:
        assert self.state is not None
        expected = self.state.expected_size
        if total is not None and expected is not None and total != expected:
            self._discard()
            raise SdkitError(f"{self.remote.source}: the server sends {total} bytes but the hub "
                             f"lists {expected}; nothing installed")
        self.state.expected_size = expected or total

    def _check_body_length(self, response: requests.Response) -> None:
        """A Content-Length that would carry the file past its expected size is refused
        before a byte of the body is read."""
        assert self.state is not None
        expected, length = self.state.expected_size, response.headers.get("Content-Length", "")
        if expected is not None and length.isdigit() and self.done + int(length) > expected:
            self._refuse_oversize(f"{self.done + int(length)} bytes but {expected} are expected")

    def _range_not_satisfiable(self, response: requests.Response) -> bool:
        """416: the part already holds every byte, or it is stale and must go."""
        assert self.state is not None
        match = re.match(r"bytes\s+\*/(\d+)", response.headers.get("Content-Range", ""))
        total = int(match.group(1)) if match else self.state.expected_size
        if total is not None and total == self.done:
            return True
        if self.done == 0:
            raise SdkitError(f"{self.remote.source}: the server refuses to send the file (HTTP 416)")
        self.options.say(f"{self.state.name}: the server refused the resume range; "
                         "restarting from zero")
        self._restart_from_zero()
        return False

    def _stream(self, response: requests.Response, total: int | None) -> None:
        assert self.file is not None and self.state is not None
        progress, last_saved = self.options.progress, self.done
        expected = self.state.expected_size
        floor = _SpeedFloor(self.options.policy)
        if progress is not None:
            progress.begin(self.state.name, total, self.done)
        try:
            limit = None if expected is None else expected - self.done
            for chunk in _chunks(response, self.options.chunk_bytes, limit):
                if expected is not None and self.done + len(chunk) > expected:
                    self._refuse_oversize(f"more than the {expected} bytes expected")
                self._write(chunk)
                if progress is not None:
                    progress.update(self.done)
                if self.done - last_saved >= self.options.state_every_bytes:
                    self._checkpoint()
                    last_saved = self.done
                floor.passed(len(chunk))
                self._check_deadline()
        finally:
            if not self.file.closed:
                self._checkpoint()
            if progress is not None:
                progress.end()
        if total is not None and self.done < total:
            raise RetryableError("the connection closed before the end of the file")

    def _check_deadline(self) -> None:
        policy = self.options.policy
        if policy.time_left() == 0.0:
            raise SdkitError(f"{self.remote.source}: stopped at {_mib(self.done)}: --max-time "
                             f"{policy.max_time:g} s reached (run the same command again to resume)")

    def _refuse_oversize(self, what: str) -> None:
        """The server sends more than the file can hold: nothing of it is kept."""
        assert self.file is not None
        self.file.close()
        self._discard()
        raise SdkitError(f"{self.remote.source}: the server sends {what}; the download was "
                         "discarded, nothing installed")

    def _write(self, chunk: bytes) -> None:
        assert self.file is not None
        try:
            self.file.write(chunk)
        except OSError as exc:
            raise SdkitError(f"{part_path(self.folder, self.state.name)}: cannot write: "  # type: ignore[union-attr]
                             f"{exc.strerror or exc}") from None
        self.hasher.update(chunk)
        self.done += len(chunk)

    def _checkpoint(self) -> None:
        assert self.file is not None and self.state is not None
        self.file.flush()
        self.state.bytes_done = self.done
        save_state(self.folder, self.state)

    # --- the end ------------------------------------------------------------------

    def _verified(self) -> Transferred:
        assert self.file is not None and self.state is not None
        self.file.flush()
        os.fsync(self.file.fileno())
        expected_size, expected_sha = self.state.expected_size, self.state.expected_sha256
        sha256 = self.hasher.hexdigest()
        if expected_size is not None and self.done != expected_size:
            self._discard()
            raise SdkitError(f"{self.remote.source}: got {self.done} bytes, expected "
                             f"{expected_size}; the download was discarded, nothing installed")
        if expected_sha is not None and sha256 != expected_sha.lower():
            self._discard()
            raise SdkitError(f"{self.remote.source}: sha256 mismatch (expected {expected_sha.lower()}, "
                             f"got {sha256}); the download was discarded, nothing installed")
        return Transferred(part_path(self.folder, self.state.name), self.state.name, sha256, self.done)
