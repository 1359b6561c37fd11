"""A JSON scanner for safetensors headers whose work and memory are bounded per entry.

`json.loads` builds the whole document before anyone can look at it: a 100 MB header of
`[],[],…` becomes tens of millions of Python objects (gigabytes) before the first rule is
checked. The header grammar is small (an object of objects whose leaves are strings and
arrays of integers), so this scanner walks it token by token over the raw bytes and lets
the caller refuse an entry, or a key that is too long, before anything large is built.

It accepts exactly RFC 8259 JSON for the values it reads: strings (decoded with the
standard escapes), unsigned integers in arrays, and scalars it is asked to skip. Nested
containers are read only where the caller asks for an object. Bytes must already be
known to be UTF-8 (the caller checks the whole header once).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Iterator

_WHITESPACE = re.compile(rb"[ \t\n\r]*")
# A piece of a string's body: plain bytes and escapes, each byte matched one way only.
# The repeat is capped because re keeps state for every repetition of a group (a 45 MB
# value of escapes would take 1.7 GB); `_string_end` joins the pieces.
_STRING_PIECE = re.compile(rb'[^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*){0,4096}', re.DOTALL)
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LITERAL = re.compile(rb"true|false|null")
_UNSIGNED = re.compile(rb"0|[1-9][0-9]*")
# an array of scalars only: what `unsigned_array` can read without nesting
_FLAT_ARRAY = re.compile(rb'\[([^\[\]{}"]*)\]')
_KINDS = {ord("{"): "object", ord("["): "array", ord('"'): "string", ord("t"): "boolean",
          ord("f"): "boolean", ord("n"): "null", ord("-"): "number",
          **{ord(digit): "number" for digit in "0123456789"}}
_JSON_SPACE = b" \t\n\r"


class JsonScanner:
    """Reads JSON values from `raw` at `pos`; `fail(what)` builds the exception to raise."""

    def __init__(self, raw: bytes, fail: Callable[[str], Exception]) -> None:
        self.raw = raw
        self.pos = 0
        self.fail = fail

    def invalid(self, expected: str) -> Exception:
        found = self.raw[self.pos:self.pos + 1]
        where = f"found {found.decode('latin-1')!r}" if found else "found the end"
        return self.fail(f"header is not valid JSON (expected {expected} at byte {self.pos}, "
                         f"{where})")

    def skip_whitespace(self) -> None:
        self.pos = _WHITESPACE.match(self.raw, self.pos).end()  # type: ignore[union-attr]

    def at_end(self) -> bool:
        self.skip_whitespace()
        return self.pos == len(self.raw)

    def kind(self) -> str:
        """JSON type of the value that starts here ("object", "array", "string", …)."""
        self.skip_whitespace()
        if self.pos >= len(self.raw) or self.raw[self.pos] not in _KINDS:
            raise self.invalid("a value")
        return _KINDS[self.raw[self.pos]]

    def expect(self, char: bytes) -> None:
        self.skip_whitespace()
        if self.raw[self.pos:self.pos + 1] != char:
            raise self.invalid(repr(char.decode()))
        self.pos += 1

    def open_object(self) -> bool:
        """Consume the `{` of an object; False when the object is empty (`}` consumed)."""
        self.expect(b"{")
        self.skip_whitespace()
        if self.raw[self.pos:self.pos + 1] == b"}":
            self.pos += 1
            return False
        return True

    def more_members(self) -> bool:
        """After a member: consume `,` (True: another follows) or `}` (False: the end)."""
        self.skip_whitespace()
        separator = self.raw[self.pos:self.pos + 1]
        if separator not in (b",", b"}"):
            raise self.invalid("',' or '}'")
        self.pos += 1
        return separator == b","

    def members(self, max_key_bytes: int, what: str) -> Iterator[str]:
        """Keys of the object starting here, one at a time; after each key the caller
        reads (or skips) its value before asking for the next."""
        more = self.open_object()
        while more:
            key = self.string(max_key_bytes, what)
            self.expect(b":")
            yield key
            more = self.more_members()

    def string(self, max_bytes: int | None = None, what: str = "a string") -> str:
        """The string token here, refused unread when its JSON form is over `max_bytes`."""
        self.skip_whitespace()
        begin = self.pos
        end = self._string_end(begin)
        if end is None:
            raise self.invalid(f"{what} in double quotes")
        if max_bytes is not None and end - begin - 2 > max_bytes:
            start = self.raw[begin + 1:begin + 41].decode("utf-8", "replace")
            raise self.fail(f"{what} starting {start!r} is {end - begin - 2} bytes long, over "
                            f"the limit of {max_bytes}")
        self.pos = end
        token = self.raw[begin:end]
        if b"\\" not in token:
            return token[1:-1].decode("utf-8")
        try:
            text: str = json.loads(token)
        except ValueError as exc:
            raise self.fail(f"header is not valid JSON (bad escape in the string at byte "
                            f"{begin}: {exc})") from None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise self.fail(f"{what} at byte {begin} contains an invalid unicode escape") from None
        return text

    def _string_end(self, begin: int) -> int | None:
        """The end of the string token opening at `begin` (after its closing quote), or
        None where there is no valid one (unterminated, a raw control character)."""
        if self.raw[begin:begin + 1] != b'"':
            return None
        position = begin + 1
        while True:
            after = _STRING_PIECE.match(self.raw, position).end()  # type: ignore[union-attr]
            stop = self.raw[after:after + 1]
            if stop == b'"':
                return after + 1
            if stop != b"\\" or after == position:  # not a capped repeat: no end here
                return None
            position = after

    def skip_scalar(self) -> None:
        """Step over a string, number, true, false or null (containers are the caller's
        to refuse: skipping one would cost as much as building it)."""
        if self.kind() == "string":
            self.string()
            return
        match = _NUMBER.match(self.raw, self.pos) or _LITERAL.match(self.raw, self.pos)
        if match is None:
            raise self.invalid("a value")
        self.pos = match.end()

    def unsigned_array(self, what: str, max_items: int, below: int, reason: str = "") -> list[int]:
        """An array of integers in [0, below) (`below` a power of two; `reason` says why
        in a refusal); refused before splitting when it has more than `max_items` items."""
        self.skip_whitespace()
        match = _FLAT_ARRAY.match(self.raw, self.pos)
        if match is None:
            if self.kind() == "array":
                raise self.fail(f"{what} holds a nested value, not non-negative integers")
            raise self.fail(f"{what} is missing or not an array")
        start, end = match.span(1)
        if _WHITESPACE.fullmatch(self.raw, start, end):
            self.pos = match.end()
            return []
        count = self.raw.count(b",", start, end) + 1  # counted in place: no copy yet
        if count > max_items:
            raise self.fail(f"{what} has {count} items, more than {max_items}")
        numbers = [self._unsigned(item.strip(_JSON_SPACE), what, below, reason)
                   for item in self.raw[start:end].split(b",")]
        self.pos = match.end()
        return numbers

    def _unsigned(self, item: bytes, what: str, below: int, reason: str) -> int:
        shown = (item if len(item) <= 40 else item[:40] + b"...").decode("ascii", "replace")
        if _UNSIGNED.fullmatch(item):
            if len(item) <= len(str(below)) and int(item) < below:
                return int(item)
            raise self.fail(f"{what} holds {shown}, not below 2**{below.bit_length() - 1}{reason}")
        if _NUMBER.fullmatch(item) or _LITERAL.fullmatch(item):
            raise self.fail(f"{what} holds {shown}, not a non-negative integer")
        raise self.fail(f"header is not valid JSON ({what} holds {shown!r})")


# A metadata value parsed as JSON builds one Python object per JSON value: kohya's
# ss_tag_frequency of several MB holds a few hundred thousand; 90 MB of `[],[],…` would
# hold 30 million (2 GB). Every value but the first follows a `[`, `{`, `,` or `:`, so
# counting those bounds the objects before any is built.
MAX_METADATA_JSON_VALUES = 2_000_000


def metadata_json(text: str | None) -> Any:
    """A metadata value (ss_tag_frequency, ss_network_args, lora_adapter_metadata, …)
    parsed as JSON; None when it is empty, not JSON, nested deeper than Python parses,
    or would build more than MAX_METADATA_JSON_VALUES values."""
    if not text:
        return None
    bound = 1 + sum(text.count(char) for char in "[{,:")
    if bound > MAX_METADATA_JSON_VALUES:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
