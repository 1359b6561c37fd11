"""Safe file names from untrusted places (Content-Disposition, URLs, hub metadata).

A name from a server is reduced to its last path component and cleaned: no separators,
no `..`, no drive or absolute paths, no control characters, no names Windows reserves,
at most NAME_BYTES bytes in UTF-8 (the extension is kept when shortening).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote, urlsplit

NAME_BYTES = 200  # below every filesystem's 255, leaving room for ".part.json" and " (12)"
_FORBIDDEN = re.compile(r'[\x00-\x1f\x7f<>:"|?*\\/]')
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com\d|lpt\d)(\..*)?$", re.IGNORECASE)
_EXTENDED_FILENAME = re.compile(r"filename\*\s*=\s*([\w!#$%&+^`{}~-]*)'[^']*'([^;\s]+)", re.IGNORECASE)
_QUOTED_FILENAME = re.compile(r'filename\s*=\s*"((?:[^"\\]|\\.)*)"', re.IGNORECASE)
_PLAIN_FILENAME = re.compile(r"filename\s*=\s*([^;\s\"]+)", re.IGNORECASE)


def sanitize_filename(raw: str, fallback: str = "download") -> str:
    """A file name safe to create inside a chosen folder, never a path."""
    name = unicodedata.normalize("NFC", raw)
    name = re.split(r"[\\/]", name)[-1]  # last component only: "../../x" -> "x", "C:\\a\\x" -> "x"
    name = _FORBIDDEN.sub("_", name).strip().strip(".").strip()
    if not name or _WINDOWS_RESERVED.match(name):
        name = fallback if not name else f"_{name}"
    return _shorten(name)


def _shorten(name: str) -> str:
    if len(name.encode("utf-8")) <= NAME_BYTES:
        return name
    suffix = "".join(Path(name).suffixes[-2:])
    if len(suffix.encode("utf-8")) > NAME_BYTES // 4:
        suffix = ""
    stem = name[: len(name) - len(suffix)] if suffix else name
    budget = NAME_BYTES - len(suffix.encode("utf-8"))
    stem = stem.encode("utf-8")[:budget].decode("utf-8", "ignore")
    return stem + suffix


def filename_from_content_disposition(header: str | None) -> str | None:
    """The file name a Content-Disposition header offers (RFC 6266: `filename*` wins)."""
    if not header:
        return None
    extended = _EXTENDED_FILENAME.search(header)
    if extended:
        charset, value = extended.group(1) or "utf-8", extended.group(2)
        try:
            return unquote(value, encoding=charset, errors="replace")
        except LookupError:  # unknown charset name
            return unquote(value, errors="replace")
    quoted = _QUOTED_FILENAME.search(header)
    if quoted:
        return re.sub(r"\\(.)", r"\1", quoted.group(1))
    plain = _PLAIN_FILENAME.search(header)
    return plain.group(1) if plain else None


def filename_from_url(url: str) -> str | None:
    path = urlsplit(url).path
    last = unquote(path.rsplit("/", 1)[-1])
    return last or None


def numbered_name(name: str, number: int) -> str:
    """`name (n).ext`, as browsers and file managers number a second copy."""
    suffix = "".join(Path(name).suffixes[-1:])
    stem = name[: len(name) - len(suffix)] if suffix else name
    return f"{stem} ({number}){suffix}"


def free_name(folder: Path, name: str) -> str:
    """`name` if nothing in `folder` has it (nor its .part), else the first free `name (n).ext`."""

    def is_free(candidate: str) -> bool:
        return not (folder / candidate).exists() and not (folder / f"{candidate}.part").exists()

    if is_free(name):
        return name
    number = 1
    while not is_free(numbered_name(name, number)):
        number += 1
    return numbered_name(name, number)
