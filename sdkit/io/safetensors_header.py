"""Parse and validate a safetensors header without touching tensor data.

The rules are those of the reference implementation (huggingface/safetensors): an
8-byte little-endian header length N (at most 100 MB, and 8+N within the file), N bytes
of UTF-8 JSON object, tensor entries whose byte ranges tile the data section exactly.
We are stricter in two places on purpose: the JSON must start with `{` (no leading
whitespace) and no object may repeat a key, so that two tools can never disagree about
which duplicate wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sdkit.errors import SdkitError, with_article
from sdkit.io.model_file import DTYPE_BITS, TensorInfo

MAX_HEADER_SIZE = 100_000_000
_USIZE_LIMIT = 2**64  # offsets and dims are u64 in the reference reader


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: what each tensor is and where its bytes lie in the file."""

    header_size: int  # N, padding included
    metadata: dict[str, str]
    infos: dict[str, TensorInfo]  # in header order
    spans: dict[str, tuple[int, int]]  # absolute [begin, end) byte offsets in the file

    @property
    def data_start(self) -> int:
        return 8 + self.header_size


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _refuse_constant(name: str) -> None:
    # json accepts NaN/Infinity; JSON (and the reference parser) does not
    raise ValueError(f"non-JSON constant {name}")


def _other_format_hint(first_bytes: bytes) -> str:
    if first_bytes.startswith(b"PK\x03\x04"):
        return " (it looks like a PyTorch zip checkpoint; give it a .ckpt or .pt name)"
    if first_bytes[:1] == b"\x80" and first_bytes[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return " (it looks like a pickle; give it a .ckpt or .pt name)"
    return ""


class _Refusal:
    """Builds the one-line error for this file, with a hint when it is another format."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hint = ""

    def __call__(self, what: str) -> SdkitError:
        return SdkitError(f"{self.path}: not a valid safetensors file: {what}{self.hint}")


def read_safetensors_header(path: Path, file: BinaryIO, file_size: int) -> SafetensorsHeader:
    """Read and validate the header of an open safetensors file (position 0)."""
    refuse = _Refusal(path)
    if file_size == 0:
        raise refuse("the file is empty")
    prefix = file.read(8)
    refuse.hint = _other_format_hint(prefix)
    if len(prefix) < 8:
        raise refuse(f"the file has {file_size} bytes, fewer than the 8-byte header length")
    header_size = int.from_bytes(prefix, "little")
    if header_size > MAX_HEADER_SIZE:
        raise refuse(f"header length {header_size} exceeds the {MAX_HEADER_SIZE}-byte limit")
    if 8 + header_size > file_size:
        raise refuse(f"header length {header_size} runs past the end of the file "
                     f"({file_size} bytes)")
    document = _parse_json(file.read(header_size), refuse)
    refuse.hint = ""
    metadata = _metadata(document.pop("__metadata__", None), refuse)
    infos, relative_spans = _entries(document, refuse)
    data_end = _check_layout(infos, relative_spans, refuse)
    data_start = 8 + header_size
    if data_start + data_end != file_size:
        raise refuse(_size_mismatch(data_start + data_end, file_size))
    spans = {name: (data_start + b, data_start + e) for name, (b, e) in relative_spans.items()}
    return SafetensorsHeader(header_size, metadata, infos, spans)


def _size_mismatch(expected: int, actual: int) -> str:
    if actual < expected:
        return (f"the file is truncated: the header describes {expected} bytes, "
                f"the file has {actual}")
    return f"{actual - expected} unexpected bytes after the last tensor"


def _parse_json(raw: bytes, refuse: _Refusal) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"header is not UTF-8 (byte {exc.start})") from None
    if not text.startswith("{"):
        raise refuse("header does not start with '{'")
    try:
        document = json.loads(text, object_pairs_hook=_object_without_duplicates,
                              parse_constant=_refuse_constant)
    except _DuplicateKey as exc:
        raise refuse(f"header repeats the key {exc.key!r}") from None
    except RecursionError:
        raise refuse("header JSON is nested too deeply") from None
    except ValueError as exc:
        raise refuse(f"header is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise refuse("header is not a JSON object")
    return document


def _check_text(text: str, what: str, refuse: _Refusal) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise refuse(f"{what} contains an invalid unicode escape") from None


def _metadata(value: Any, refuse: _Refusal) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise refuse(f"__metadata__ is {with_article(_json_type(value))}, not an object")
    for key, item in value.items():
        if not isinstance(item, str):
            raise refuse(f"__metadata__[{key!r}] is {with_article(_json_type(item))}, not a string")
        _check_text(key, "a __metadata__ key", refuse)
        _check_text(item, f"__metadata__[{key!r}]", refuse)
    return value


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string",
             list: "array", dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _entries(document: dict[str, Any], refuse: _Refusal
             ) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]]]:
    infos: dict[str, TensorInfo] = {}
    spans: dict[str, tuple[int, int]] = {}
    for name, entry in document.items():
        _check_text(name, "a tensor name", refuse)
        if not isinstance(entry, dict):
            raise refuse(f"tensor {name!r}: entry is {with_article(_json_type(entry))}, not an object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise refuse(f"tensor {name!r}: unknown dtype {dtype!r}")
        shape = _unsigned_list(entry.get("shape"), None, f"tensor {name!r}: shape", refuse)
        offsets = _unsigned_list(entry.get("data_offsets"), 2, f"tensor {name!r}: data_offsets",
                                 refuse)
        infos[name] = TensorInfo(name, dtype, tuple(shape))
        spans[name] = (offsets[0], offsets[1])
    return infos, spans


def _unsigned_list(value: Any, length: int | None, what: str, refuse: _Refusal) -> list[int]:
    if not isinstance(value, list):
        raise refuse(f"{what} is missing or not an array")
    if length is not None and len(value) != length:
        raise refuse(f"{what} has {len(value)} items, expected {length}")
    for item in value:
        if type(item) is not int or not 0 <= item < _USIZE_LIMIT:
            raise refuse(f"{what} holds {item!r}, not a non-negative integer")
    return value


def _exact_nbytes(info: TensorInfo, refuse: _Refusal) -> int:
    bits = info.numel * DTYPE_BITS[info.dtype]
    if bits >= 8 * _USIZE_LIMIT:
        raise refuse(f"tensor {info.name!r}: shape {list(info.shape)} is too large")
    if bits % 8:
        raise refuse(f"tensor {info.name!r}: {bits} bits of {info.dtype} do not fill whole bytes")
    return bits // 8


def _check_layout(infos: dict[str, TensorInfo], spans: dict[str, tuple[int, int]],
                  refuse: _Refusal) -> int:
    """Byte ranges, sorted by offset, must tile [0, end) exactly; returns end."""
    position = 0
    for name in sorted(spans, key=spans.__getitem__):
        begin, end = spans[name]
        if begin > position:
            raise refuse(f"tensor {name!r}: data starts at {begin}, leaving a gap after {position}")
        if begin < position:
            raise refuse(f"tensor {name!r}: data starts at {begin}, overlapping data that "
                         f"ends at {position}")
        if end < begin:
            raise refuse(f"tensor {name!r}: data ends at {end}, before it begins at {begin}")
        expected = _exact_nbytes(infos[name], refuse)
        if end - begin != expected:
            info = infos[name]
            raise refuse(f"tensor {name!r}: holds {end - begin} bytes but {info.dtype} "
                         f"{list(info.shape)} needs {expected}")
        position = end
    return position
