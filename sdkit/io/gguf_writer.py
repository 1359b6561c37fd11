"""Streaming, atomic GGUF writer.

A GGUF file is a header (key/value fields, then each tensor's name, dims, GGML type and
data offset) followed by the tensors' data, each starting on the file's alignment (32).
The `gguf` package's `GGUFWriter` serializes the header from tensor infos alone
(`add_tensor_info`), so every type and shape is fixed first; the data then goes out one
tensor at a time, produced by its plan's `produce()` when its turn comes (ahead on worker
threads, within a byte budget: `sdkit.io.ahead`), so memory holds a few tensors, never
the model. Dims are written as GGUF stores them, fastest-varying first (the reverse of
PyTorch's order; GGUFWriter reverses the shape it is given).

The file is built at a hidden path beside the target and installed by one rename once
complete and fsynced (`sdkit.io.output_path`): on any failure, Ctrl-C included, no
partial output is left behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gguf
import numpy as np

from sdkit.io.ahead import AHEAD_BUDGET, Prefetcher
from sdkit.io.output_path import write_file_atomically



@dataclass(frozen=True)
class TypedField:
    """A value with its GGUF type (and its items' type, for an array): a field copied
    from another file as it was stored."""

    value: Any
    kind: gguf.GGUFValueType
    item_kind: gguf.GGUFValueType | None = None


Field = str | int | list[int] | TypedField


@dataclass(frozen=True)
class GgufTensor:
    """One tensor as it will be stored: name, PyTorch-order shape as stored, GGML type,
    and what makes its bytes (an array whose bytes are the tensor's data)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        block, block_bytes = gguf.GGML_QUANT_SIZES[self.ggml_type]
        count = int(np.prod(self.shape, dtype=np.int64))
        return count // block * block_bytes


def _add_field(writer: gguf.GGUFWriter, key: str, value: Field) -> None:
    if isinstance(value, TypedField):
        writer.add_key_value(key, value.value, value.kind, value.item_kind)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)  # integers: an ARRAY of INT32, as ComfyUI-GGUF reads it
    else:
        writer.add_uint32(key, value)


def _pad(file, alignment: int) -> None:
    file.write(b"\0" * (-file.tell() % alignment))


def write_gguf(path: str | os.PathLike[str], architecture: str, fields: Mapping[str, Field],
               tensors: Sequence[GgufTensor], *, overwrite: bool = False,
               progress: Callable[[int], None] | None = None,
               finish: Callable[[Path, int], None] | None = None) -> Path:
    """Write `tensors` (in this order) with `general.architecture` and `fields` to `path`.
    `finish(partial, header_end)` runs on the complete file before it is installed."""
    target = Path(path)

    def produce(partial: Path) -> None:
        writer = gguf.GGUFWriter(partial, architecture)
        for key, value in fields.items():
            _add_field(writer, key, value)
        for tensor in tensors:
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes,
                                   raw_dtype=tensor.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        file = writer.fout[0]
        header_end = file.tell()
        plans = {tensor.name: tensor for tensor in tensors}
        ahead = Prefetcher(lambda name: plans[name].produce(), cost=lambda name: plans[name].nbytes * 4,
                           budget=AHEAD_BUDGET)
        try:
            with ahead.start([tensor.name for tensor in tensors]):
                for tensor in tensors:
                    data = np.ascontiguousarray(ahead.get(tensor.name))
                    if data.nbytes != tensor.nbytes:  # a wrong plan must never make a file
                        raise AssertionError(f"{tensor.name}: {data.nbytes} bytes, planned {tensor.nbytes}")
                    _pad(file, writer.data_alignment)
                    file.write(memoryview(data).cast("B"))
                    if progress is not None:
                        progress(tensor.nbytes)
            _pad(file, writer.data_alignment)
        finally:
            writer.close()
        if finish is not None:
            finish(partial, header_end)

    return write_file_atomically(target, produce, overwrite=overwrite)


def patch_field_text(file: Path, header_end: int, placeholder: str, value: str) -> None:
    """Write `value` over each `placeholder` in the header of `file` (same length, so the
    file stays valid): digests known only once the data is written."""
    old, new = placeholder.encode(), value.encode()
    assert len(old) == len(new)
    with open(file, "r+b") as handle:
        header = handle.read(header_end)
        start = header.find(old)
        while start >= 0:
            handle.seek(start)
            handle.write(new)
            start = header.find(old, start + 1)
