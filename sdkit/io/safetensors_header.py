"""Parse and validate a safetensors header without touching tensor data.

The rules are those of the reference implementation (huggingface/safetensors): an
8-byte little-endian header length N (at most 100 MB, and 8+N within the file), N bytes
of UTF-8 JSON object, tensor entries whose byte ranges tile the data section exactly.
We are stricter on purpose where two tools could disagree or where a valid file could
cost minutes and gigabytes to read:
- the JSON must start with `{` (no leading whitespace) and no object may repeat a key,
  so that two tools can never disagree about which duplicate wins;
- a shape's non-zero dimensions must multiply to less than 2**63 (torch counts elements
  in int64, and refuses the shape otherwise even when a zero makes it empty), a shape
  has at most MAX_DIMS dimensions, and a tensor entry holds no nested value besides its
  arrays;
- the header may list at most MAX_TENSORS tensors and MAX_METADATA_KEYS metadata keys,
  and names and keys are at most MAX_NAME_BYTES long.
The header is read entry by entry (`safetensors_json`), so a file over a limit is refused
when the limit is crossed, before the rest of it is built.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sdkit.errors import SdkitError, with_article
from sdkit.io.model_file import DTYPE_BITS, TensorInfo
from sdkit.io.safetensors_json import JsonScanner

MAX_HEADER_SIZE = 100_000_000
# Far above real files (checkpoints hold < 5 000 tensors with names < 300 bytes; kohya
# writes ~100 metadata keys, some of several MB, which only the header size bounds).
MAX_TENSORS = 50_000
MAX_METADATA_KEYS = 50_000
MAX_NAME_BYTES = 4096  # tensor names and metadata keys, as written in the JSON
MAX_DIMS = 64  # numpy's limit; real tensors have at most 5
_USIZE_LIMIT = 2**64  # offsets are u64 in the reference reader
_DIM_LIMIT = 2**63  # torch sizes are int64: a larger dimension can never reach torch
_UTF8_PIECE = 1 << 20


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
    raw = file.read(header_size)
    _check_utf8(raw, refuse)
    if not raw.startswith(b"{"):
        raise refuse("header does not start with '{'")
    refuse.hint = ""
    metadata, infos, relative_spans = _parse_entries(JsonScanner(raw, refuse), refuse)
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


def _check_utf8(raw: bytes, refuse: _Refusal) -> None:
    """The whole header must be UTF-8; checked in pieces, so no decoded copy is kept
    (a 100 MB header with one 4-byte character would decode to 400 MB)."""
    if raw.isascii():
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(raw)
    for start in range(0, len(raw), _UTF8_PIECE):
        try:
            decoder.decode(view[start:start + _UTF8_PIECE], final=start + _UTF8_PIECE >= len(raw))
        except UnicodeDecodeError as exc:
            raise refuse(f"header is not UTF-8 (byte {max(0, start + exc.start)})") from None


def _parse_entries(scanner: JsonScanner, refuse: _Refusal
                   ) -> tuple[dict[str, str], dict[str, TensorInfo], dict[str, tuple[int, int]]]:
    """Metadata, tensor infos and relative spans, read one top-level entry at a time."""
    metadata: dict[str, str] | None = None
    infos: dict[str, TensorInfo] = {}
    spans: dict[str, tuple[int, int]] = {}
    more = scanner.open_object()
    while more:
        entry = _canonical_entry(scanner)
        if entry is not None:
            name, info, span, more = entry
        else:
            name = scanner.string(MAX_NAME_BYTES, "a tensor name")
            scanner.expect(b":")
            if name == "__metadata__":
                if metadata is not None:
                    raise refuse(f"header repeats the key {name!r}")
                metadata = _metadata(scanner, refuse)
                more = scanner.more_members()
                continue
            info, span = _tensor_entry(scanner, name, refuse)
            more = scanner.more_members()
        if name in infos:
            raise refuse(f"header repeats the key {name!r}")
        if len(infos) == MAX_TENSORS:
            raise refuse(f"the header lists more than {MAX_TENSORS} tensors (the limit)")
        infos[name], spans[name] = info, span
    if not scanner.at_end():
        raise scanner.invalid("only whitespace after the header object")
    return metadata or {}, infos, spans


# An entry as writers spell it (`"name": {"dtype": …, "shape": […], "data_offsets": […]}`,
# any JSON whitespace), with every value in range by construction: at most 18-digit
# dimensions (< 2**63), MAX_DIMS of them, 19-digit offsets (< 2**64), a name without
# escapes. One match reads it; anything else takes the token-by-token path, which
# accepts the same entries and names what is wrong with the others.
_S = rb"[ \t\n\r]*"
_DIM = rb"(?:0|[1-9][0-9]{0,17})"
_OFFSET = rb"(0|[1-9][0-9]{0,18})"
_CANONICAL = re.compile(
    _S + rb'"([^"\\\x00-\x1f]{0,%d})"' % MAX_NAME_BYTES + _S + rb":" + _S + rb"\{" + _S
    + rb'"dtype"' + _S + rb":" + _S + rb'"([A-Z0-9_]{1,16})"' + _S + rb"," + _S
    + rb'"shape"' + _S + rb":" + _S + rb"\[" + _S
    + rb"(%s(?:%s,%s%s){0,%d})?" % (_DIM, _S, _S, _DIM, MAX_DIMS - 1) + _S + rb"\]" + _S
    + rb"," + _S + rb'"data_offsets"' + _S + rb":" + _S + rb"\[" + _S + _OFFSET + _S + rb","
    + _S + _OFFSET + _S + rb"\]" + _S + rb"\}" + _S + rb"([,}])")


def _canonical_entry(scanner: JsonScanner
                     ) -> tuple[str, TensorInfo, tuple[int, int], bool] | None:
    """The entry at the scanner (and whether another follows) when it is spelled as
    writers spell it; None otherwise, leaving the scanner where it was."""
    match = _CANONICAL.match(scanner.raw, scanner.pos)
    if match is None:
        return None
    raw_name, raw_dtype, dims, begin, end, separator = match.groups()
    name, dtype = raw_name.decode("utf-8"), raw_dtype.decode()
    if name == "__metadata__" or dtype not in DTYPE_BITS:
        return None  # the token-by-token path says what is wrong
    shape = tuple(int(dim) for dim in dims.split(b",")) if dims else ()
    scanner.pos = match.end()
    return name, TensorInfo(name, dtype, shape), (int(begin), int(end)), separator == b","


def _metadata(scanner: JsonScanner, refuse: _Refusal) -> dict[str, str]:
    kind = scanner.kind()
    if kind == "null":  # the reference reads a null __metadata__ as none
        scanner.skip_scalar()
        return {}
    if kind != "object":
        raise refuse(f"__metadata__ is {with_article(kind)}, not an object")
    metadata: dict[str, str] = {}
    for key in scanner.members(MAX_NAME_BYTES, "a __metadata__ key"):
        if key in metadata:
            raise refuse(f"header repeats the key {key!r}")
        if len(metadata) == MAX_METADATA_KEYS:
            raise refuse(f"__metadata__ has more than {MAX_METADATA_KEYS} keys (the limit)")
        kind = scanner.kind()
        if kind != "string":
            raise refuse(f"__metadata__[{key!r}] is {with_article(kind)}, not a string")
        metadata[key] = scanner.string(what=f"__metadata__[{key!r}]")
    return metadata


def _tensor_entry(scanner: JsonScanner, name: str, refuse: _Refusal
                  ) -> tuple[TensorInfo, tuple[int, int]]:
    kind = scanner.kind()
    if kind != "object":
        raise refuse(f"tensor {name!r}: entry is {with_article(kind)}, not an object")
    fields: dict[str, object] = {}
    for field in scanner.members(MAX_NAME_BYTES, f"a field name of tensor {name!r}"):
        if field in fields:
            raise refuse(f"header repeats the key {field!r}")
        fields[field] = _tensor_field(scanner, name, field, refuse)
    dtype = fields.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise refuse(f"tensor {name!r}: unknown dtype {dtype!r}")
    shape, offsets = fields.get("shape"), fields.get("data_offsets")
    if not isinstance(shape, list):
        raise refuse(f"tensor {name!r}: shape is missing or not an array")
    if not isinstance(offsets, list):
        raise refuse(f"tensor {name!r}: data_offsets is missing or not an array")
    if len(offsets) != 2:
        raise refuse(f"tensor {name!r}: data_offsets has {len(offsets)} items, expected 2")
    return TensorInfo(name, dtype, tuple(shape)), (offsets[0], offsets[1])


def _tensor_field(scanner: JsonScanner, name: str, field: str, refuse: _Refusal) -> object:
    """The value of one field of a tensor entry; an unknown field may hold a scalar only
    (skipping a nested value unread is impossible, and building it is the cost refused)."""
    if field == "shape":
        return scanner.unsigned_array(f"tensor {name!r}: shape", MAX_DIMS, _DIM_LIMIT,
                                      " (torch sizes are signed 64-bit)")
    if field == "data_offsets":
        return scanner.unsigned_array(f"tensor {name!r}: data_offsets", 2, _USIZE_LIMIT)
    kind = scanner.kind()
    if field == "dtype":
        if kind != "string":
            raise refuse(f"tensor {name!r}: unknown dtype ({with_article(kind)}, not a name)")
        return scanner.string(MAX_NAME_BYTES, f"the dtype of tensor {name!r}")
    if kind in ("object", "array"):
        raise refuse(f"tensor {name!r}: {field!r} holds {with_article(kind)}, where a tensor "
                     "entry holds only dtype, shape, data_offsets and scalars")
    scanner.skip_scalar()
    return None


def _exact_nbytes(info: TensorInfo, refuse: _Refusal) -> int:
    nonzero = 1
    for dim in info.shape:
        nonzero *= dim or 1
    if nonzero >= _DIM_LIMIT:  # torch multiplies every size into an int64, zeros aside
        raise refuse(f"tensor {info.name!r}: shape {list(info.shape)} is too large: its "
                     "non-zero dimensions multiply to 2**63 or more, past torch's int64 count")
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
