"""Lazy tensors: what a tensor will be (dtype, shape) and how to produce it.

Operations pass `dict[str, LazyTensor]` around; nothing is computed until the writer or
a runtime calls `load()`, one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator

from sdkit.io.byte_span import ByteSpan
from sdkit.io.model_file import ModelFile, loaded_dtype, tensor_nbytes

if TYPE_CHECKING:
    import torch

# producers that can make a tensor in pieces (merges, casts) do so from this size on
PIECEWISE_BYTES = 32 << 20


@dataclass(frozen=True)
class LazyTensor:
    """A tensor not yet produced: `load()` must return exactly this dtype and shape.

    `span()`, when given, may name open file bytes that already hold exactly the tensor's
    data (an unchanged input tensor): the writer then copies those bytes in the kernel
    instead of calling `load()`. Only keep it on a tensor whose bytes are the source's.

    `chunks()`, when given, yields the tensor's data in pieces (tensors of this dtype
    whose flattened concatenation is the tensor): the writer writes each as it comes, so
    a tensor far larger than a slice never exists whole in memory. A piece may also be
    yielded as a function that makes it, independent of every other piece: the writer
    then makes a few at once on its worker threads (`Prefetcher.made_in_order`).

    `fresh`: `load()` makes a new tensor each time (computed, not a view of a file or of
    another tensor), which its caller may change in place instead of copying it.
    """

    dtype: str  # safetensors code, e.g. "F16"
    shape: tuple[int, ...]
    load: Callable[[], "torch.Tensor"]
    span: Callable[[], ByteSpan | None] | None = None
    chunks: Callable[[], Iterator["torch.Tensor"]] | None = None
    fresh: bool = False

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def lazy_tensors(model_file: ModelFile) -> dict[str, LazyTensor]:
    """Every tensor of a ModelFile, wrapped without loading any of them.

    A GGUF quantized tensor is described as what `load` makes of it (float32); its file
    has no span for it, its stored bytes being blocks rather than the tensor's."""
    return {name: LazyTensor(loaded_dtype(info.dtype), info.shape, partial(model_file.load, name),
                             model_file.span_of(name))
            for name, info in model_file.infos.items()}
