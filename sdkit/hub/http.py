"""HTTP plumbing shared by the hubs: retry policy, error messages, credential hygiene.

Credentials only ever travel in request headers (`Authorization: Bearer …`); requests
drops that header when a redirect leaves the host (signed storage URLs carry their own
authorisation). URLs are redacted before they are shown or stored anywhere.
"""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests

from sdkit.errors import SdkitError

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
SECRET_QUERY_KEYS = frozenset({"token", "access_token", "api_key", "apikey", "auth", "key"})
NETWORK_ERRORS = (requests.ConnectionError, requests.Timeout)


@dataclass
class RetryPolicy:
    """How often and how long to wait before giving up on a flaky server.

    `attempts` counts consecutive failures without progress; waits double from `backoff`
    up to `backoff_cap`; a server's Retry-After is honoured up to `retry_after_cap`.
    `sleep` is injectable so tests can record waits instead of spending them.
    """

    attempts: int = 6
    backoff: float = 1.0
    backoff_cap: float = 60.0
    retry_after_cap: float = 300.0
    timeout: float = 30.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def wait_before(self, failures: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `failures` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap)
        return min(self.backoff * 2 ** (failures - 1), self.backoff_cap)


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


def redact_url(url: str) -> str:
    """The URL without credentials: user:password and token-like query parameters."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k.lower() not in SECRET_QUERY_KEYS]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment))


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
    return ": ".join(words)


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
    failures = 0
    while True:
        try:
            response = session.get(url, headers=headers, timeout=policy.timeout)
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
        failures += 1
        if failures >= policy.attempts:
            raise SdkitError(f"{what}: {error} (gave up after {failures} tries)")
        wait = policy.wait_before(failures, error.retry_after)
        if notify is not None:
            notify(f"{what}: {error}; retrying in {wait:.0f} s")
        policy.sleep(wait)
