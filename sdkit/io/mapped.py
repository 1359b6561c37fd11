"""Tensors that live in a memory-mapped region of a file.

Regions are mapped copy-on-write: a tensor is writable, pages are read from disk only
when touched, and in-place edits stay in memory, never reaching the file. Each mapping
holds its own reference to the file, so tensors outlive the ModelFile that made them.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

from sdkit.errors import SdkitError

if TYPE_CHECKING:
    import torch


def map_region(fileno: int, offset: int, length: int) -> tuple[mmap.mmap, int]:
    """Map [offset, offset+length) of a file; returns the mapping and the region's start in it."""
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(fileno, length + offset - aligned, offset=aligned, access=mmap.ACCESS_COPY)
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
        # a region is mapped to be read whole, soon: have the kernel read it in now, in
        # large requests, rather than a fault's worth at a time when first touched
        mapping.madvise(mmap.MADV_WILLNEED)
    return mapping, offset - aligned


def torch_dtype(code: str, where: str) -> "torch.dtype":
    """torch dtype for a safetensors dtype code; SdkitError for those torch cannot hold."""
    from sdkit.io.dtypes import CODE_TO_TORCH

    dtype = CODE_TO_TORCH.get(code)
    if dtype is None:
        raise SdkitError(f"{where}: loading {code} tensors is not supported")
    return dtype


def tensor_from_mapping(mapping: mmap.mmap, start: int, dtype: "torch.dtype",
                        count: int) -> "torch.Tensor":
    """A 1-D tensor of `count` (> 0) elements over the mapping, starting `start` bytes in."""
    import torch

    return torch.frombuffer(mapping, dtype=dtype, count=count, offset=start)


def read_tensor(fileno: int, offset: int, dtype: "torch.dtype", count: int) -> "torch.Tensor":
    """A 1-D tensor of `count` elements stored at `offset` in the file, mapped on its own."""
    import torch

    if count == 0:  # nothing to map (and mmap refuses empty regions)
        return torch.empty(0, dtype=dtype)
    mapping, start = map_region(fileno, offset, count * dtype.itemsize)
    return tensor_from_mapping(mapping, start, dtype, count)
