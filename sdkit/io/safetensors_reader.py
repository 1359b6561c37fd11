"""Open a `.safetensors` file: header parsed up front, tensors mapped on demand.

Opening reads only the header (no torch import), so inspecting a multi-gigabyte file
costs a few milliseconds. The file stays open until `close()` so that every load reads
the same inode even if the path is replaced meanwhile. Each `load` maps just that
tensor's bytes: two loads of one name are independent tensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from sdkit.errors import SdkitError
from sdkit.io.byte_span import ByteSpan
from sdkit.io.mapped import read_tensor, torch_dtype
from sdkit.io.model_file import ModelFile
from sdkit.io.safetensors_header import SafetensorsHeader, read_safetensors_header

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


class _SafetensorsTensors:
    """Loads tensors of one open safetensors file."""

    def __init__(self, path: Path, fileno: int, header: SafetensorsHeader) -> None:
        self.path = path
        self.fileno: int | None = fileno
        self.header = header

    def load(self, name: str) -> "torch.Tensor":
        if self.fileno is None:
            raise SdkitError(f"{self.path}: file was closed before tensor {name!r} was loaded")
        info = self.header.infos[name]
        dtype = torch_dtype(info.dtype, f"{self.path}: tensor {name!r}")
        begin = self.header.spans[name][0]
        return read_tensor(self.fileno, begin, dtype, info.numel).reshape(info.shape)

    def span(self, name: str) -> ByteSpan:
        if self.fileno is None:
            raise SdkitError(f"{self.path}: file was closed before tensor {name!r} was copied")
        begin, end = self.header.spans[name]
        return ByteSpan(str(self.path), self.fileno, begin, end - begin)

    def close(self) -> None:
        if self.fileno is not None:
            os.close(self.fileno)
            self.fileno = None


def open_safetensors(path: Path) -> ModelFile:
    """ModelFile over a safetensors file; SdkitError naming the broken rule if invalid."""
    fileno = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        file_size = os.fstat(fileno).st_size
        with os.fdopen(os.dup(fileno), "rb") as file:
            header = read_safetensors_header(path, file, file_size)
    except BaseException:
        os.close(fileno)
        raise
    tensors = _SafetensorsTensors(path, fileno, header)
    return ModelFile(path=path, format="safetensors", infos=dict(header.infos),
                     metadata=dict(header.metadata), size_bytes=file_size,
                     _loader=tensors.load, _closer=tensors.close, _spanner=tensors.span)
