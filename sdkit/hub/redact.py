"""Credentials out of every URL and message sdkit shows, logs or writes down.

A URL carries secrets under many names: Civitai's `token`, `hf_token`, S3's
`X-Amz-Signature` / `X-Amz-Credential` / `X-Amz-Security-Token`, Azure's `sig`, Google's
`X-Goog-Signature`, `api_key`, `password`, `session`, an Azure function's `code`, and a
`user:password@` before the host. No list of names keeps up with the hosts, so a rule
decides: a parameter name, with camelCase, `-` and `.` read as word breaks, is secret
when one of its words is a secret word (`key`, `sig`, `code`, …) or when it contains a
secret stem (`token`, `secret`, `passw`, `signature`, `credential`, `session`, `auth`, …).
Its value is replaced by REDACTED and the name kept, so people still see that the URL
had one. Redacting a harmless parameter (`author=`) costs nothing; missing a secret
leaks it. `redact_url` is for one URL, `redact_text` for a message that may hold some.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus, urlsplit, urlunsplit

REDACTED = "REDACTED"
SECRET_STEMS = ("token", "secret", "passw", "pwd", "signature", "credential", "session",
                "apikey", "auth", "cookie", "jwt", "private")
SECRET_WORDS = frozenset({"key", "sig", "sign", "pass", "cred", "creds", "sid", "code", "otp",
                          "hmac"})
_CAMEL_BREAK = re.compile(r"([a-z0-9])([A-Z])")
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s<>\"'`]+")
_PAIR_IN_TEXT = re.compile(r"(?<![\w.-])([A-Za-z][\w.-]*)=([^\s&\"'<>;,]+)")
_BEARER_IN_TEXT = re.compile(r"\bBearer\s+[\w.~+/=-]+", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether a query parameter (or form field) of this name likely holds a credential."""
    spaced = _CAMEL_BREAK.sub(r"\1_\2", unquote_plus(name)).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", spaced) if w]
    joined = "_".join(words)
    return any(w in SECRET_WORDS for w in words) or any(s in joined for s in SECRET_STEMS)


def _redact_pairs(text: str) -> str:
    """`a=1&token=x` -> `a=1&token=REDACTED`, every other byte kept as it was."""
    pieces = []
    for piece in text.split("&"):
        name, equals, _ = piece.partition("=")
        pieces.append(f"{name}={REDACTED}" if equals and is_secret_name(name) else piece)
    return "&".join(pieces)


def redact_url(url: str) -> str:
    """The URL with its userinfo and the values of credential-like parameters redacted."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL (a bad port, a stray bracket): keep nothing risky
        return _redact_loose(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    fragment = _redact_pairs(parts.fragment) if "=" in parts.fragment else parts.fragment
    return urlunsplit((parts.scheme, netloc, parts.path, _redact_pairs(parts.query), fragment))


def _redact_loose(text: str) -> str:
    text = re.sub(r"(://)[^/@\s]*@", rf"\1{REDACTED}@", text)
    return _PAIR_IN_TEXT.sub(_redact_pair_match, text)


def _redact_pair_match(match: re.Match[str]) -> str:
    return f"{match.group(1)}={REDACTED}" if is_secret_name(match.group(1)) else match.group(0)


def redact_text(text: str) -> str:
    """A message with every URL in it redacted, and `name=value` pairs and `Bearer …`
    credentials outside URLs too (a server's error text may echo what it was sent)."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    text = _PAIR_IN_TEXT.sub(_redact_pair_match, text)
    return _BEARER_IN_TEXT.sub(f"Bearer {REDACTED}", text)
