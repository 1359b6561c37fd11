"""Open a `.gguf` file (llama.cpp's format, in which ComfyUI-GGUF ships quantized FLUX,
SD3, Wan, Qwen-Image, … diffusion models) as a ModelFile.

The file is parsed by the `gguf` package (llama.cpp's own Python reader): `GGUFReader`
maps the file and lists its key/value fields and its tensors (name, GGML type, dims,
data offset); `gguf.quants.dequantize` turns a quantized tensor's blocks into float32.
What this module adds, and the facts it relies on:

- Bounds. GGUFReader trusts the file: a read past the end comes back as an empty view,
  so a count or length beyond the file makes it fail with a bare IndexError, or loop
  (an array of 2**60 numbers reads empty numbers without end). Here every read it makes
  must lie inside the file, the number of values it reads is capped, and the header's
  counts, names, dims and tensor extents are checked against named limits; anything
  refused is one SdkitError line.
- Shapes. GGUF lists a tensor's dims fastest-varying first (ne[0] is the row length),
  the reverse of PyTorch's order. ComfyUI-GGUF's `tools/convert.py` reshapes some SD1/SDXL
  tensors to (n/256, 256) so that rows fill K-quant blocks, and records the original
  shape in the key `comfy.gguf.orig_shape.<tensor name>`, an ARRAY of INT32 in PyTorch
  order. Its `loader.py` (`get_orig_shape`) uses that shape when the key exists, refuses
  any other value type, and otherwise takes the reversed dims; so does this reader.
- Architecture. ComfyUI-GGUF's files carry `general.architecture` (its loader accepts
  "flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan",
  "lumina2", "qwen_image"; text encoders "t5", "llama", …) with `general.file_type` and
  `general.quantization_version`; every field is kept in `metadata`, rendered as text.
- Data. F32/F16/BF16 (and integer) tensors are plain little-endian arrays, mapped like
  safetensors data; quantized ones load dequantized to float32 (`sdkit.io.gguf_dtypes`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

import gguf
import numpy as np

from sdkit.errors import SdkitError
from sdkit.io.byte_span import ByteSpan
from sdkit.io.gguf_dtypes import code_of, is_quantized_code
from sdkit.io.mapped import read_tensor, torch_dtype
from sdkit.io.model_file import ModelFile, TensorInfo, tensor_nbytes

if TYPE_CHECKING:
    import torch

GGUF_MAGIC = b"GGUF"
GGUF_SUFFIXES = (".gguf",)
# magic, version, tensor count, key/value count: the fixed start of every GGUF file
_PREFIX = struct.Struct("<4sIQQ")
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."

# Far above real files (a FLUX GGUF holds ~780 tensors and ~10 keys; an LLM text encoder
# a few hundred thousand tokenizer values), as for safetensors headers.
MAX_TENSORS = 50_000
MAX_METADATA_KEYS = 50_000
MAX_NAME_BYTES = 4096  # tensor names and metadata keys
MAX_DIMS = 64  # numpy's limit; GGML itself stops at 4
# Every scalar, string and array item of the header is a read of GGUFReader, which keeps
# numpy views for each (~700 bytes and ~12 us per item here): this bounds the header's
# memory and time (~1.4 GB, ~25 s). A LLaMA-3 text encoder's tokenizer takes ~1M reads;
# a diffusion model's header a few thousand.
MAX_HEADER_READS = 2_000_000
_DIM_LIMIT = 2**63  # torch sizes are int64
# arrays of at most this many items are shown as JSON; longer ones are summarised
MAX_JSON_ARRAY_ITEMS = 64
_GGML_TYPES = frozenset(int(kind) for kind in gguf.GGMLQuantizationType)
# entries GGUFReader adds for the header's counts: the tensors and keys themselves say it
_READER_COUNT_FIELDS = frozenset({"GGUF.tensor_count", "GGUF.kv_count"})


class _Refusal:
    """Builds the one-line error for this file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, what: str) -> SdkitError:
        return SdkitError(f"{self.path}: not a valid GGUF file: {what}")


class _BoundedReader(gguf.GGUFReader):
    """GGUFReader whose every read lies inside the file, which reads at most
    MAX_HEADER_READS values (it otherwise reads past the end as empty arrays), and which
    checks each tensor's name and dims before it builds the tensor (where numpy would
    multiply the dims modulo 2**64)."""

    def __init__(self, file: BinaryIO, refuse: _Refusal) -> None:
        self._refuse = refuse
        self._reads = 0
        super().__init__(file)  # type: ignore[arg-type]  (numpy maps file objects too)

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
        self._reads += 1
        if self._reads > MAX_HEADER_READS:
            raise self._refuse(f"the header holds more than {MAX_HEADER_READS:,} values")
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise self._refuse(self._past_the_end(int(offset), end))
        return super()._get(offset, dtype, count, override_order)

    def _past_the_end(self, offset: int, end: int) -> str:
        # GGUFReader sets data_offset once the header is read: later reads are tensor data
        if hasattr(self, "data_offset"):
            return (f"tensor data at bytes {offset:,}..{end:,} lies past the end of the file "
                    f"({len(self.data):,} bytes)")
        return (f"the header runs past the end of the file at byte {len(self.data):,} "
                f"(it points to byte {end:,}): truncated or corrupt")

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        for field in fields:  # parts as the GGUF tensor info: name length, name, n_dims, dims, …
            name = _checked_name(self._refuse, bytes(field.parts[1]).decode("utf-8", "replace"),
                                 "tensor name")
            _checked_numel(self._refuse, name, [int(dim) for dim in field.parts[3].tolist()])
            if int(field.parts[4][0]) not in _GGML_TYPES:
                raise self._refuse(f"tensor {name!r} has GGML type {int(field.parts[4][0])}, "
                                   "which the gguf package does not know")
        super()._build_tensors(start_offs, fields)


@dataclass(frozen=True)
class _GgufTensor:
    """One tensor: what it is, and where its bytes lie."""

    info: TensorInfo  # logical (PyTorch) shape, dtype code as stored
    ggml_type: gguf.GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int
    blocks: np.ndarray  # the stored bytes (a view of the reader's mapping)


def has_gguf_magic(first_bytes: bytes) -> bool:
    return first_bytes[:4] == GGUF_MAGIC


def _check_prefix(refuse: _Refusal, file: BinaryIO) -> None:
    """Magic, byte order and counts, refused before GGUFReader builds anything."""
    head = file.read(_PREFIX.size)
    file.seek(0)
    if not has_gguf_magic(head):
        raise refuse("it does not start with the GGUF magic bytes")
    if len(head) < _PREFIX.size:
        raise refuse(f"truncated: {len(head)} bytes, shorter than the {_PREFIX.size}-byte header")
    _magic, version, tensor_count, kv_count = _PREFIX.unpack(head)
    if version & 0xFFFF == 0:  # what GGUFReader takes for the other byte order
        raise refuse("big-endian GGUF files are not supported")
    if tensor_count > MAX_TENSORS:
        raise refuse(f"it lists {tensor_count:,} tensors, more than {MAX_TENSORS:,}")
    if kv_count > MAX_METADATA_KEYS:
        raise refuse(f"it lists {kv_count:,} metadata keys, more than {MAX_METADATA_KEYS:,}")


def _read_gguf(refuse: _Refusal, file: BinaryIO) -> gguf.GGUFReader:
    """GGUFReader over the open file; its failures become one-line refusals."""
    try:
        return _BoundedReader(file, refuse)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError) as exc:
        # GGUFReader's own checks: version, value types, duplicates, alignment, UTF-8
        raise refuse(str(exc.args[0] if exc.args else exc)) from None


def _checked_name(refuse: _Refusal, name: str, what: str) -> str:
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise refuse(f"{what} starting {name[:40]!r} is over the limit of {MAX_NAME_BYTES} bytes")
    return name


def _checked_numel(refuse: _Refusal, name: str, dims: list[int]) -> int:
    """Element count of `dims` (GGUF or PyTorch order), refused when torch cannot hold it."""
    if len(dims) > MAX_DIMS:
        raise refuse(f"tensor {name!r} has {len(dims)} dimensions, more than {MAX_DIMS}")
    if any(dim < 0 for dim in dims):
        raise refuse(f"tensor {name!r} has a negative dimension {dims}")
    numel = math.prod(dims)
    if numel >= _DIM_LIMIT or any(dim >= _DIM_LIMIT for dim in dims):
        raise refuse(f"tensor {name!r} has dimensions {dims}, over 2**63 elements")
    return numel


def _orig_shape(refuse: _Refusal, reader: gguf.GGUFReader, name: str) -> tuple[int, ...] | None:
    """ComfyUI-GGUF's record of a reshaped tensor's PyTorch shape, when there is one."""
    field = reader.get_field(ORIG_SHAPE_KEY + name)
    if field is None:
        return None
    if field.types != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]:
        kinds = "/".join(kind.name for kind in field.types)
        raise refuse(f"{ORIG_SHAPE_KEY}{name} is {kinds}, not an ARRAY of INT32")
    return tuple(int(field.parts[index][0]) for index in field.data)


def _logical_shape(refuse: _Refusal, reader: gguf.GGUFReader, name: str,
                   dims: list[int], numel: int) -> tuple[int, ...]:
    shape = _orig_shape(refuse, reader, name)
    if shape is None:
        return tuple(reversed(dims))
    if _checked_numel(refuse, name, list(shape)) != numel:
        raise refuse(f"{ORIG_SHAPE_KEY}{name} is {list(shape)}, which does not hold the "
                      f"tensor's {numel:,} elements")
    return shape


def _tensor_entry(refuse: _Refusal, reader: gguf.GGUFReader, tensor: Any,
                  file_size: int) -> _GgufTensor:
    name = _checked_name(refuse, tensor.name, "tensor name")
    dims = [int(dim) for dim in tensor.shape.tolist()]
    numel = _checked_numel(refuse, name, dims)
    code = code_of(tensor.tensor_type)
    info = TensorInfo(name, code, _logical_shape(refuse, reader, name, dims, numel))
    nbytes = tensor_nbytes(code, tuple(dims))
    offset = int(tensor.data_offset)
    if offset + nbytes > file_size:  # GGUFReader's reads are bounded too; this says which
        raise refuse(f"data of tensor {name!r} (bytes {offset:,}..{offset + nbytes:,}) lies "
                     f"past the end of the file ({file_size:,} bytes)")
    return _GgufTensor(info, tensor.tensor_type, offset, nbytes, tensor.data)


def _render_scalar(part: np.ndarray, kind: gguf.GGUFValueType) -> Any:
    """A field value as a JSON-able Python value (floats at their shortest float32 form)."""
    if kind == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", "replace")
    if kind == gguf.GGUFValueType.BOOL:
        return bool(part[0])
    if kind in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
        return float(str(part[0]))
    return int(part[0])


def _render_array(field: Any) -> str:
    item_kind = field.types[1] if len(field.types) > 1 else None
    if item_kind is None:
        return "[]"
    if item_kind == gguf.GGUFValueType.ARRAY:
        return "[array of arrays]"
    if len(field.data) > MAX_JSON_ARRAY_ITEMS:
        return f"[{len(field.data):,} {item_kind.name} values]"
    return json.dumps([_render_scalar(field.parts[index], item_kind) for index in field.data],
                      ensure_ascii=False)


def render_field(field: Any) -> str:
    """A GGUF key/value as metadata text: strings as they are, numbers as decimal text,
    booleans as true/false, short arrays as JSON, long ones as a count."""
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return _render_array(field)
    value = _render_scalar(field.parts[field.data[0]], field.types[0])
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _metadata(refuse: _Refusal, reader: gguf.GGUFReader) -> dict[str, str]:
    return {_checked_name(refuse, name, "metadata key"): render_field(field)
            for name, field in reader.fields.items() if name not in _READER_COUNT_FIELDS}


class _GgufTensors:
    """Loads tensors of one open GGUF file."""

    def __init__(self, path: Path, fileno: int, entries: dict[str, _GgufTensor]) -> None:
        self.path = path
        self.fileno: int | None = fileno
        self.entries = entries

    def load(self, name: str) -> "torch.Tensor":
        if self.fileno is None:
            raise SdkitError(f"{self.path}: file was closed before tensor {name!r} was loaded")
        entry = self.entries[name]
        if is_quantized_code(entry.info.dtype):
            return self._dequantized(entry)
        dtype = torch_dtype(entry.info.dtype, f"{self.path}: tensor {name!r}")
        return read_tensor(self.fileno, entry.offset, dtype, entry.info.numel).reshape(entry.info.shape)

    def _dequantized(self, entry: _GgufTensor) -> "torch.Tensor":
        import torch

        if entry.info.numel == 0:
            return torch.empty(entry.info.shape, dtype=torch.float32)
        try:
            values = gguf.quants.dequantize(entry.blocks, entry.ggml_type)
        except NotImplementedError:
            raise SdkitError(f"{self.path}: tensor {entry.info.name!r}: the gguf package cannot "
                             f"dequantize {entry.ggml_type.name} tensors") from None
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(entry.info.shape)

    def elements(self, name: str) -> "Callable[[int, int], torch.Tensor] | None":
        """For a quantized tensor: `read(start, count)`, its flattened elements [start,
        start + count) dequantized to float32 from only the blocks that hold them (blocks
        dequantize independently: the same values as the whole tensor's); None for a
        plain tensor (its bytes are a span)."""
        entry = self.entries[name]
        if not is_quantized_code(entry.info.dtype) or entry.info.numel == 0:
            return None
        block, stored = gguf.GGML_QUANT_SIZES[entry.ggml_type]
        raw = entry.blocks.reshape(-1)

        def read(start: int, count: int) -> "torch.Tensor":
            import torch

            first, last = start // block, -(-(start + count) // block)
            try:
                values = gguf.quants.dequantize(raw[first * stored:last * stored].reshape(-1, stored),
                                                entry.ggml_type)
            except NotImplementedError:
                raise SdkitError(f"{self.path}: tensor {name!r}: the gguf package cannot "
                                 f"dequantize {entry.ggml_type.name} tensors") from None
            skip = start - first * block
            flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)[skip:skip + count]
            return torch.from_numpy(flat)
        return read

    def span(self, name: str) -> ByteSpan | None:
        """The stored bytes of a plain tensor (a quantized one has none: its bytes are
        blocks, not the float32 tensor `load` returns)."""
        if self.fileno is None:
            raise SdkitError(f"{self.path}: file was closed before tensor {name!r} was copied")
        entry = self.entries[name]
        if is_quantized_code(entry.info.dtype):
            return None
        return ByteSpan(str(self.path), self.fileno, entry.offset, entry.nbytes)

    def close(self) -> None:
        self.entries = {}  # drops the views, so the reader's mapping can go
        if self.fileno is not None:
            os.close(self.fileno)
            self.fileno = None


def _read_entries(path: Path, file: BinaryIO, file_size: int) -> tuple[dict[str, _GgufTensor], dict[str, str]]:
    refuse = _Refusal(path)
    _check_prefix(refuse, file)
    reader = _read_gguf(refuse, file)
    entries = {tensor.name: _tensor_entry(refuse, reader, tensor, file_size)
               for tensor in reader.tensors}
    return entries, _metadata(refuse, reader)


@dataclass(frozen=True)
class StoredField:
    """A key/value as the file stores it: the value, its GGUF type and, for an array,
    its items' type."""

    key: str
    value: Any
    kind: gguf.GGUFValueType
    item_kind: gguf.GGUFValueType | None = None


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as the file stores it: GGML type, dims in PyTorch order (reversed GGUF
    dims, before any `comfy.gguf.orig_shape`), and its bytes (a view of the mapping)."""

    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class GgufLayout:
    """A GGUF file's header fields and tensors in file order, as stored: what a writer
    needs to write the file again with some tensors replaced."""

    architecture: str
    fields: list[StoredField]
    tensors: list[StoredTensor]


def read_gguf_layout(path: Path) -> GgufLayout:
    """The stored fields and tensors of a GGUF file (checked as `open_gguf` checks it);
    the tensors' bytes stay mapped, not read."""
    refuse = _Refusal(path)
    with open(path, "rb") as file:
        reader = _read_gguf(refuse, file)
        fields = [_stored_field(refuse, name, field) for name, field in reader.fields.items()
                  if name not in _READER_COUNT_FIELDS and name != "GGUF.version"]
        tensors = [StoredTensor(tensor.name, tensor.tensor_type,
                                tuple(reversed([int(dim) for dim in tensor.shape.tolist()])), tensor.data)
                   for tensor in reader.tensors]
    architecture = next((f.value for f in fields if f.key == "general.architecture"), None)
    if not isinstance(architecture, str):
        raise refuse("it has no general.architecture string")
    return GgufLayout(architecture, [f for f in fields if f.key != "general.architecture"], tensors)


def _stored_field(refuse: _Refusal, name: str, field: Any) -> StoredField:
    kind = field.types[0]
    if kind != gguf.GGUFValueType.ARRAY:
        return StoredField(name, field.contents(), kind)
    item_kind = field.types[1] if len(field.types) > 1 else gguf.GGUFValueType.INT32
    if item_kind == gguf.GGUFValueType.ARRAY:
        raise refuse(f"key {name!r} holds arrays of arrays, which sdkit does not copy")
    return StoredField(name, field.contents() if field.data else [], kind, item_kind)


def open_gguf(path: Path) -> ModelFile:
    """ModelFile over a GGUF file; SdkitError naming the broken rule if invalid."""
    fileno = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        file_size = os.fstat(fileno).st_size
        with os.fdopen(os.dup(fileno), "rb") as file:
            entries, metadata = _read_entries(path, file, file_size)
    except BaseException:
        os.close(fileno)
        raise
    tensors = _GgufTensors(path, fileno, entries)
    infos = {name: entry.info for name, entry in entries.items()}
    return ModelFile(path=path, format="gguf", infos=infos, metadata=metadata,
                     size_bytes=file_size, _loader=tensors.load, _closer=tensors.close,
                     _spanner=tensors.span, _elements=tensors.elements)
