"""Quantized weights back to plain values before `convert --dtype` casts them.

(GGUF tensors need nothing here: the reader dequantizes them as they load.)

ComfyUI's scaled fp8 stores `<layer>.weight` in fp8 beside a one-value float32
`<layer>.scale_weight`; the real weight is their product (ComfyUI `ops.py`
`scaled_fp8_ops`). Casting the fp8 values alone would lose the scale, so each scaled
weight is first made `fp8 value × scale` in float32 and the scale tensors, the optional
`scale_input` (an activation scale for fp8 matmuls) and the `scaled_fp8` marker are left
out: the output is a plain model any loader reads.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from sdkit.arch.quantization import MARKER
from sdkit.errors import SdkitError
from sdkit.io import LazyTensor

if TYPE_CHECKING:
    import torch

    from sdkit.arch.quantization import QuantFormat

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


# ---- ComfyUI mixed precision (`_quantization_metadata` / `.comfy_quant`) ------------------------

_MIXED_SIDE_TENSORS = (".comfy_quant", ".weight_scale", ".weight_scale_2", ".input_scale")


def _row_scaled(weight: LazyTensor, scale: LazyTensor) -> "torch.Tensor":
    """A weight times its scale: one value, or one per output row (ComfyUI's tensor- and
    row-wise fp8 / int8 layouts)."""
    from sdkit.ops.fp8 import scaled_values

    return scaled_values(weight.load(), scale.load())


def dequantize_mixed(tensors: dict[str, LazyTensor], layers: dict[str, "QuantFormat | None"],
                     where: str) -> tuple[dict[str, LazyTensor], int]:
    """(the tensors with every listed layer's weight as float32 values and its scales and
    markers left out, how many layers). Block-scaled and packed formats (nvfp4, mxfp8) are
    refused: their scales follow a tiled layout sdkit does not unpack yet."""
    blocked = [layer for layer, fmt in layers.items() if fmt is None or fmt.block_scale or fmt.tensor_scales]
    if blocked:
        raise SdkitError(f"{where}: {blocked[0]} is block-scaled or packed ({len(blocked)} such layers); "
                         "sdkit dequantizes tensor- and row-scaled fp8 / int8 layers only")
    out: dict[str, LazyTensor] = {}
    for name, lazy in tensors.items():
        layer, _, leaf = name.rpartition(".")
        if layer in layers and "." + leaf in _MIXED_SIDE_TENSORS:
            continue
        if layer in layers and leaf == "weight":
            scale = tensors[f"{layer}.{layers[layer].row_scale}"]
            out[name] = LazyTensor("F32", lazy.shape, partial(_row_scaled, lazy, scale))
        else:
            out[name] = lazy
    return out, len(layers)


def plain_values(model: Any, identity: Any, tensors: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
    """`tensors` of `model` with scaled fp8 and mixed-precision weights as their values
    (their scales and markers left out); other files' tensors as they are (plain fp8 and
    GGUF become values on load)."""
    from sdkit.arch.quantization import mixed_layer_formats

    scheme = (identity.precision.quantization or {}).get("scheme")
    if scheme == "mixed":
        return dequantize_mixed(tensors, mixed_layer_formats(model), str(model.path))[0]
    if scheme == "scaled-fp8":
        return dequantize_scaled_fp8(tensors)[0]
    return tensors
