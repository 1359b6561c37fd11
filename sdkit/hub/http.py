"""HTTP plumbing shared by the hubs: retry policy, error messages, credential hygiene.

Credentials only ever travel in request headers (`Authorization: Bearer …`); requests
drops that header when a redirect leaves the host (signed storage URLs carry their own
authorisation). URLs and server messages go through sdkit.hub.redact before they are
shown or stored anywhere.
"""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

import requests

from sdkit.errors import SdkitError
from sdkit.hub.redact import redact_text

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
NETWORK_ERRORS = (requests.ConnectionError, requests.Timeout)


@dataclass
class RetryPolicy:
    """How often and how long to try before giving up on a flaky or hostile server.

    A file gives up after `attempts` failed tries (dropped connection, timeout, 429, 5xx)
    that brought fewer than `progress_bytes` new bytes each. A failed try that brought
    more is forgiven, but a server sending a little per connection must not keep a
    download going forever: `attempts * tries_per_attempt` tries in all end it too. A
    connection slower than `min_speed` bytes/s over `speed_window` seconds is cut (a
    failed try), and with `max_time` nothing goes on past that many seconds after the
    policy was made (one command). Waits double from `backoff` up to `backoff_cap`; a
    server's Retry-After is honoured up to `retry_after_cap`. `sleep` is injectable so
    tests can record waits instead of spending them.
    """

    attempts: int = 6
    backoff: float = 1.0
    backoff_cap: float = 60.0
    retry_after_cap: float = 300.0
    timeout: float = 30.0
    progress_bytes: int = 1 << 20
    tries_per_attempt: int = 10
    min_speed: float = 1024.0
    speed_window: float = 60.0
    max_time: float | None = None
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    started: float = field(default_factory=time.monotonic, repr=False)

    def wait_before(self, failures: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `failures` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap)
        return min(self.backoff * 2 ** (failures - 1), self.backoff_cap)

    def time_left(self) -> float | None:
        """Seconds until `max_time` runs out (never below 0); None without a limit."""
        if self.max_time is None:
            return None
        return max(0.0, self.started + self.max_time - time.monotonic())

    def read_timeout(self) -> float:
        """The socket timeout for the next request: `timeout`, shortened near the deadline."""
        left = self.time_left()
        return self.timeout if left is None else max(0.1, min(self.timeout, left))


class RetryBudget:
    """The tries one file (or one API call) has spent under a RetryPolicy."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.tries = 0       # failed tries
        self.fruitless = 0   # failed tries that brought less than policy.progress_bytes

    def spend(self, new_bytes: int, retry_after: float | None) -> tuple[float, str | None]:
        """Count a failed try that brought `new_bytes`: (seconds to wait before the next
        try, None) or (0, why to give up now)."""
        policy = self.policy
        self.tries += 1
        self.fruitless += new_bytes < policy.progress_bytes
        if self.fruitless >= policy.attempts or self.tries >= policy.attempts * policy.tries_per_attempt:
            return 0.0, f"gave up after {self.tries} tries"
        wait = policy.wait_before(max(1, self.fruitless), retry_after)
        left = policy.time_left()
        if left is not None and wait >= left:
            return 0.0, f"gave up after {self.tries} tries: --max-time {policy.max_time:g} s reached"
        return wait, None


class HttpRefused(SdkitError):
    """A request the server refused for good (4xx other than 408/425/429)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RetryableError(Exception):
    """A failure worth another try: dropped connection, timeout, 429 or 5xx."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_seconds(response: requests.Response) -> float | None:
    """The Retry-After header as seconds (it may be a number or an HTTP date)."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def query_token(url: str) -> str | None:
    """A `token=` query parameter (Civitai's alternative to the header), if any."""
    for key, value in parse_qsl(urlsplit(url).query):
        if key.lower() == "token" and value:
            return value
    return None


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _body_fields(response: requests.Response) -> dict[str, Any]:
    """`error` / `message` / `deadline` of a JSON error body (Civitai style), if any."""
    try:
        body = json.loads(response.content[:65536] or b"null")
    except (ValueError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _server_words(response: requests.Response) -> str:
    body = _body_fields(response)
    words = [str(body[k]) for k in ("error", "message") if body.get(k)]
    if not words and response.headers.get("X-Error-Message"):
        words.append(response.headers["X-Error-Message"])
    return redact_text(": ".join(words))  # a server may echo the signed URL it refused


def describe_http_error(response: requests.Response, *, token_sent: bool,
                        token_env: str | None) -> str:
    """One line for a refused request, with what the user can do about it."""
    status = response.status_code
    body = _body_fields(response)
    words = _server_words(response)
    if status == 401:
        advice = ("the token was refused" if token_sent
                  else f"set {token_env}" if token_env else "credentials needed")
        return f"HTTP 401: login required ({advice})" + (f"; server says: {words}" if words else "")
    if status == 403 and str(body.get("error", "")).lower() == "early access":
        deadline = body.get("deadline") or "an unannounced date"
        return f"HTTP 403: early access only until {deadline}" + (
            f"; {body['message']}" if body.get("message") else "")
    if status == 403 and response.headers.get("X-Error-Code") == "GatedRepo":
        return "HTTP 403: gated repository: accept its terms on the Hub, then set HF_TOKEN"
    reasons = {403: "access denied", 404: "not found", 410: "gone (archived)",
               416: "requested range not satisfiable", 429: "rate limited (too many requests)"}
    reason = reasons.get(status, response.reason or "request failed")
    return f"HTTP {status}: {reason}" + (f"; server says: {words}" if words else "")


def check_response(response: requests.Response, *, what: str, token_sent: bool,
                   token_env: str | None) -> None:
    """Raise RetryableError for transient statuses, SdkitError for refusals."""
    if response.status_code < 400:
        return
    message = describe_http_error(response, token_sent=token_sent, token_env=token_env)
    if response.status_code in RETRYABLE_STATUS:
        raise RetryableError(message, retry_after_seconds(response))
    raise HttpRefused(f"{what}: {message}", response.status_code)


def get_json(session: requests.Session, url: str, *, headers: dict[str, str], what: str,
             policy: RetryPolicy, token_env: str | None,
             notify: Callable[[str], None] | None = None) -> Any:
    """GET a JSON document, retrying transient failures under `policy`."""
    budget = RetryBudget(policy)
    while True:
        try:
            response = session.get(url, headers=headers, timeout=policy.read_timeout())
            check_response(response, what=what, token_sent="Authorization" in headers,
                           token_env=token_env)
            try:
                return response.json()
            except ValueError:
                raise SdkitError(f"{what}: the server did not answer with JSON") from None
        except NETWORK_ERRORS as exc:
            error = RetryableError(f"network error: {exc.__class__.__name__}")
        except RetryableError as exc:
            error = exc
        except requests.RequestException as exc:
            raise request_refused(what, exc) from None
        wait, give_up = budget.spend(0, error.retry_after)
        if give_up is not None:
            raise SdkitError(f"{what}: {error} ({give_up})")
        if notify is not None:
            notify(f"{what}: {error}; retrying in {wait:.0f} s")
        policy.sleep(wait)


def request_refused(what: str, exc: requests.RequestException) -> SdkitError:
    """One line for a request requests itself refused (a bad URL, a redirect loop, an
    unsupported scheme): its text names the URL, so it is redacted."""
    detail = redact_text(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
    return SdkitError(f"{what}: {exc.__class__.__name__}" + (f": {detail}" if detail else ""))
