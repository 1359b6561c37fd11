"""Float tensors to the bytes of a GGUF tensor of a given GGML type, a slice of rows at a
time, with the quantization error measured for the report.

F32 values are stored as they are; F16 / BF16 and the legacy block types (Q8_0, Q5_0, …)
by the `gguf` package's quantizers (llama.cpp's reference in Python); the K-quants by
`sdkit.io.gguf_kquants`, bit-exact with llama.cpp's. A slice of rows at a time: the
float32 copy, the quantizer's temporaries and the error sums stay a few tens of megabytes
whatever the tensor's size. The error (each slice dequantized again by
`gguf.quants.dequantize`) goes to a `LayerClassErrors` report per layer class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import gguf
import numpy as np

from sdkit.errors import SdkitError
from sdkit.io import LazyTensor
from sdkit.io.gguf_kquants import QUANTIZERS, quantize_k
from sdkit.ops.quant_error import LayerClassErrors

if TYPE_CHECKING:
    import torch

Q = gguf.GGMLQuantizationType
SLICE_VALUES = 1 << 22  # values quantized at once
# the block types sdkit writes (the K-quants are sdkit's own quantizers)
BLOCK_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K")
WRITABLE_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, *(Q[name] for name in BLOCK_TYPES)})


def _count(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def stored_values(values: np.ndarray, kind: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 `values` as GGUF stores them in type `kind`."""
    if kind == Q.F32:
        return values
    if kind.name in QUANTIZERS:
        return quantize_k(values, kind.name)
    return gguf.quants.quantize(values, kind)


CONVERT_F16_ADVICE = "use --quant BF16 or keep it with a bfloat16 source"


def gguf_producer(name: str, lazy: LazyTensor, kind: gguf.GGMLQuantizationType, shape: tuple[int, ...],
                  report: LayerClassErrors | None, f16_advice: str = CONVERT_F16_ADVICE) -> Callable[[], np.ndarray]:
    """What makes the stored bytes of `lazy` (reshaped to the stored `shape`) in type
    `kind`; the error goes to `report` (None: not measured). `f16_advice` ends the
    refusal of values float16 cannot hold."""
    def produce() -> np.ndarray:
        rows = lazy.load().reshape(shape)
        step = max(1, SLICE_VALUES // max(1, _count(shape[1:])))
        error = _ErrorSums()
        parts = [_stored_slice(name, rows[start:start + step], kind, error if report is not None else None,
                               f16_advice) for start in range(0, rows.shape[0], step)]
        if report is not None:
            report.record(name, error.max_abs, error.squared_error, error.squared_norm)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    return produce


@dataclass
class _ErrorSums:
    max_abs: float = 0.0
    squared_error: float = 0.0
    squared_norm: float = 0.0


def _stored_slice(name: str, rows: "torch.Tensor", kind: gguf.GGMLQuantizationType,
                  error: _ErrorSums | None, f16_advice: str) -> np.ndarray:
    import torch

    values = rows.to(torch.float32).numpy()
    if not np.isfinite(values).all():
        raise SdkitError(f"{name}: holds inf or nan values; they have no GGUF {kind.name} form")
    with np.errstate(over="ignore"):  # float16 overflow is refused below, in one line
        stored = stored_values(values, kind)
    if kind == Q.F16 and np.isinf(stored).any():
        raise SdkitError(f"{name}: values beyond float16's range (±65504); {f16_advice}")
    if error is not None:
        _measure(values, stored, kind, error)
    return stored


def _measure(values: np.ndarray, stored: np.ndarray, kind: gguf.GGMLQuantizationType, error: _ErrorSums) -> None:
    difference = gguf.quants.dequantize(stored, kind).reshape(values.shape) - values
    if difference.size:
        error.max_abs = max(error.max_abs, float(np.abs(difference).max()))
    error.squared_error += float(np.square(difference, dtype=np.float64).sum())
    error.squared_norm += float(np.square(values, dtype=np.float64).sum())
