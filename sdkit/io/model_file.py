"""The reader-side picture of a model file: tensor names, shapes and dtypes up front,
tensor data only when asked for.

Every reader (safetensors, restricted pickle, diffusers folder, GGUF) returns a
`ModelFile`. Dtypes are spelled as in the safetensors header ("F16", "BF16", "F32", "I64",
...) so that a header-only reader never has to import torch to describe a file. GGUF's
block-quantized tensors have codes of their own ("GGUF_Q8_0", "GGUF_Q4_K", …; see
`sdkit.io.gguf_dtypes`): they are stored in blocks, and load dequantized to float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

if TYPE_CHECKING:  # torch is imported lazily: inspecting a header must stay fast
    import torch

    from sdkit.io.byte_span import ByteSpan

# safetensors dtype code -> bits per element (sub-byte float formats included)
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2",
                          "F8_E4M3FNUZ", "F8_E5M2FNUZ"})

# codes of GGUF block-quantized tensors start so; their sizes come from the gguf package,
# imported only when such a code is met
GGUF_QUANT_PREFIX = "GGUF_"


def _block_layout(dtype: str) -> tuple[int, int] | None:
    """(elements per block, bytes per block) of a GGUF quantized code, else None."""
    if not dtype.startswith(GGUF_QUANT_PREFIX):
        return None
    from sdkit.io.gguf_dtypes import block_layout

    return block_layout(dtype)


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes taken by a C-contiguous tensor of this dtype and shape (for a quantized
    code: the bytes of its blocks, as stored)."""
    count = 1
    for dim in shape:
        count *= dim
    layout = _block_layout(dtype)
    if layout is None:
        return count * DTYPE_BITS[dtype] // 8
    block_size, type_size = layout
    return -(-count // block_size) * type_size  # a partial block still takes a whole one


def dtype_bits(dtype: str) -> float:
    """Bits per element as stored (8.5 for GGUF Q8_0: 34 bytes per 32 elements)."""
    layout = _block_layout(dtype)
    if layout is None:
        return float(DTYPE_BITS[dtype])
    block_size, type_size = layout
    return type_size * 8 / block_size


def loaded_dtype(dtype: str) -> str:
    """The code of the tensor `load` returns for a tensor stored as `dtype`: the same,
    except GGUF quantized tensors, which load dequantized to float32."""
    return "F32" if dtype.startswith(GGUF_QUANT_PREFIX) else dtype


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass
class ModelFile:
    """A model on disk, described by its tensors' headers; data is read lazily.

    - `infos` maps every tensor name to its TensorInfo, in the file's order.
      For diffusers folders names are `<component>/<key>` (e.g. `unet/conv_in.weight`).
    - `metadata` is the str->str metadata (safetensors `__metadata__`, or the
      non-tensor scalars of a pickle rendered as strings, or model_index.json facts).
    - `extra` holds non-tensor values found in pickles, by flattened dotted path
      (e.g. `string_to_token.*`, `layer_structure`, `global_step`).
    - `components` (diffusers folders only) maps component name -> its ModelFile.
    - `load(name)` returns the tensor (memory-mapped where the format allows); a GGUF
      quantized tensor comes dequantized, as float32 (`loaded_dtype`).
    """

    path: Path
    format: str  # "safetensors" | "pickle" | "diffusers" | "gguf" | "memory"
    infos: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    components: dict[str, "ModelFile"] = field(default_factory=dict)
    size_bytes: int = 0
    _loader: Callable[[str], "torch.Tensor"] | None = field(default=None, repr=False)
    _closer: Callable[[], None] | None = field(default=None, repr=False)
    _spanner: Callable[[str], "ByteSpan | None"] | None = field(default=None, repr=False)
    _elements: Callable[[str], "Callable[[int, int], torch.Tensor] | None"] | None = field(default=None, repr=False)

    # mapping-like access over tensor names
    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of a tensor, or None when the file has no such tensor."""
        info = self.infos.get(name)
        return info.shape if info else None

    def load(self, name: str) -> "torch.Tensor":
        if name not in self.infos:
            raise KeyError(name)
        if self._loader is None:
            raise RuntimeError(f"{self.path}: tensors of this file cannot be loaded")
        return self._loader(name)

    def span(self, name: str) -> "ByteSpan | None":
        """The file bytes holding tensor `name` exactly as stored, while the file is open;
        None where the format keeps no such bytes (pickles)."""
        if self._spanner is None or name not in self.infos:
            return None
        return self._spanner(name)

    def elements(self, name: str) -> "Callable[[int, int], torch.Tensor] | None":
        """`read(start, count)`: flattened elements of a tensor stored in blocks (a GGUF
        quantized one) as `load` makes them, reading only the blocks that hold them; None
        where the format has no such reads (a span or `load` is the way)."""
        if self._elements is None or name not in self.infos:
            return None
        return self._elements(name)

    def span_of(self, name: str) -> Callable[[], "ByteSpan | None"] | None:
        """`span` for later (None when this file never has spans)."""
        return None if self._spanner is None else partial(self.span, name)

    @property
    def parameters(self) -> int:
        return sum(info.numel for info in self.infos.values())

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None
        for component in self.components.values():
            component.close()

    def __enter__(self) -> "ModelFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dtype_code(dtype: "torch.dtype") -> str:
    """torch dtype -> safetensors dtype code."""
    from sdkit.io.dtypes import TORCH_TO_CODE

    return TORCH_TO_CODE[dtype]


def model_from_tensors(tensors: Mapping[str, "torch.Tensor"], path: str | Path = "<memory>",
                       metadata: Mapping[str, str] | None = None) -> ModelFile:
    """An in-memory ModelFile over a dict of tensors (for ops, runtimes and tests)."""
    infos = {name: TensorInfo(name, dtype_code(t.dtype), tuple(t.shape)) for name, t in tensors.items()}
    data = dict(tensors)
    return ModelFile(
        path=Path(path), format="memory", infos=infos, metadata=dict(metadata or {}),
        size_bytes=sum(i.nbytes for i in infos.values()), _loader=data.__getitem__,
    )
