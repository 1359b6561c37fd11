"""Quantized weights back to plain values before `convert --dtype` casts them.

ComfyUI's scaled fp8 stores `<layer>.weight` in fp8 beside a one-value float32
`<layer>.scale_weight`; the real weight is their product (ComfyUI `ops.py`
`scaled_fp8_ops`). Casting the fp8 values alone would lose the scale, so each scaled
weight is first made `fp8 value × scale` in float32 and the scale tensors, the optional
`scale_input` (an activation scale for fp8 matmuls) and the `scaled_fp8` marker are left
out: the output is a plain model any loader reads.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from sdkit.arch.quantization import MARKER
from sdkit.io import LazyTensor

if TYPE_CHECKING:
    import torch

_SCALE = ".scale_weight"
_INPUT_SCALE = ".scale_input"


def _product(weight: LazyTensor, scale: LazyTensor) -> "torch.Tensor":
    import torch

    return weight.load().to(torch.float32) * scale.load().to(torch.float32).reshape(())


def dequantize_scaled_fp8(tensors: dict[str, LazyTensor]) -> tuple[dict[str, LazyTensor], int]:
    """(the tensors with every scaled weight as its float32 value and no scale or marker
    tensors, how many weights were scaled)."""
    out: dict[str, LazyTensor] = {}
    scaled = 0
    for name, lazy in tensors.items():
        if name.endswith((_SCALE, _INPUT_SCALE)) or name.rsplit(".", 1)[-1] == MARKER or name == MARKER:
            continue
        scale = tensors.get(name[: -len(".weight")] + _SCALE) if name.endswith(".weight") else None
        if scale is None:
            out[name] = lazy
            continue
        out[name] = LazyTensor("F32", lazy.shape, partial(_product, lazy, scale))
        scaled += 1
    return out, scaled
