"""Weights cast to fp8 the ways ComfyUI loads them, with the error each layer class takes.

Three stored forms (facts from ComfyUI `comfy/ops.py`, `comfy/quant_ops.py`,
`comfy/utils.py` `convert_old_quants`, read not copied):

- "plain": the weight itself in `float8_e4m3fn` / `float8_e5m2` (ComfyUI's
  `weight_dtype`; values beyond the format's range are clamped to it, never NaN);
- "scaled": `<layer>.weight` in fp8 divided by a per-tensor float32 scale stored beside it
  as `<layer>.scale_weight` (0-d), and a `<prefix>scaled_fp8` marker tensor whose dtype
  names the format: the scale is the largest |value| over the format's largest value, so
  the whole range is used;
- "mixed": the same weight and scale named as ComfyUI's per-layer quantization does
  (`<layer>.weight_scale`, a `<layer>.comfy_quant` uint8 JSON `{"format": …}` tensor) and
  listed in the `_quantization_metadata` safetensors metadata.

Only matrices (2-D `*.weight`: the linear layers, where fp8 matmuls run) are cast; biases,
norms, convolutions and anything a keep pattern names stay as they are. What stays is
decided by the family (`Family.fp8_keep`: embedders, final layers, modulation where the
released fp8 files keep them) and by the user's patterns.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from sdkit.arch.quantization import MARKER, METADATA_KEY
from sdkit.errors import SdkitError
from sdkit.io import LazyTensor
from sdkit.ops.quant_error import LayerClassErrors

if TYPE_CHECKING:
    import torch

# dtype name -> (safetensors code, torch dtype name, ComfyUI format name)
FP8_DTYPES = {"fp8_e4m3fn": ("F8_E4M3", "float8_e4m3fn"), "fp8_e5m2": ("F8_E5M2", "float8_e5m2")}
SCALINGS = ("plain", "scaled", "mixed")
_FLOAT_SOURCES = ("F32", "F16", "BF16", "F64")
# tensors that are lookup tables, not matmul weights, in any model: token and position
# embeddings, T5's shared table and relative-position bias, language-model heads
_NEVER = re.compile(r"(^|\.)(embed_tokens|token_embedding|position_embedding|shared|relative_attention_bias|"
                    r"lm_head|embeddings?)\.")


@dataclass
class Fp8Report(LayerClassErrors):
    """What an fp8 cast did: the matrices cast, those kept, the error per layer class."""

    dtype: str  # "fp8_e4m3fn" | "fp8_e5m2"
    scaling: str
    cast: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"dtype": self.dtype, "scaling": self.scaling, "cast": len(self.cast), "kept": self.kept,
                "errors": self.errors_json()}


def fp8_candidate(name: str, lazy: LazyTensor) -> bool:
    return lazy.dtype in _FLOAT_SOURCES and len(lazy.shape) == 2 and name.endswith(".weight") \
        and not _NEVER.search(name)


def _limits(dtype: str) -> tuple["torch.dtype", float]:
    import torch

    torch_dtype = getattr(torch, FP8_DTYPES[dtype][1])
    return torch_dtype, float(torch.finfo(torch_dtype).max)


def fp8_scale(weight: "torch.Tensor", dtype: str, scaling: str,
              scale_dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """The float32 scale ComfyUI stores beside a float `weight` in fp8 (16 or 32 bits: the
    largest |value| is the same in float32): scaling "plain"
    (1), "tensor" (one: the largest |value| over the format's largest value) or "row"
    (one such value per output row, shaped (rows, 1)). Rounded to `scale_dtype` first
    where the file stores scales narrower than float32, so that values × stored scale is
    the weight; an all-zero weight or row gets 1."""
    import torch

    _torch_dtype, largest = _limits(dtype)
    if scaling == "plain" or not weight.numel():
        scale = torch.ones((), dtype=torch.float32)
    elif scaling == "row":  # the division in float64, as for one scale
        scale = (_peaks(weight.reshape(weight.shape[0], -1), dim=1).unsqueeze(1).to(torch.float64)
                 / largest).to(torch.float32)
    else:
        scale = torch.tensor(float(_peaks(weight)) / largest, dtype=torch.float32)
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).to(torch.float32)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _peaks(weight: "torch.Tensor", dim: int | None = None) -> "torch.Tensor":
    """The largest |value| (per row along `dim`), without a |weight| copy; NaN stays NaN."""
    import torch

    low, high = torch.aminmax(weight) if dim is None else torch.aminmax(weight, dim=dim)
    return torch.maximum(low.neg(), high)


def fp8_values(weight: "torch.Tensor", dtype: str, scale: "torch.Tensor") -> "torch.Tensor":
    """A float32 `weight` divided by its `scale` (one value, or one per row) in fp8,
    values beyond the format's range clamped to it, never NaN."""
    torch_dtype, largest = _limits(dtype)
    rows = scale.reshape(-1, *([1] * (weight.ndim - 1))) if scale.numel() > 1 else scale.reshape(())
    return (weight / rows).clamp_(-largest, largest).to(torch_dtype)


def scaled_values(values: "torch.Tensor", scale: "torch.Tensor") -> "torch.Tensor":
    """Stored values times their scale (one value, or one per output row) in float32:
    the weight ComfyUI's tensor- and row-scaled layouts mean."""
    import torch

    from sdkit.io.float8 import to_float32

    widened = to_float32(values)
    factors = scale.to(torch.float32)
    factors = factors.reshape(()) if factors.numel() == 1 else factors.reshape(-1, *([1] * (values.ndim - 1)))
    # a widened copy is ours to scale in place; a float32 input is the caller's
    return widened.mul_(factors) if widened is not values else widened * factors


_BLOCK_ELEMENTS = 1 << 22  # rows of a weight requantized at a time (16 MiB of float32)


class Fp8Weight:
    """One weight in fp8 and its scale tensor, each made when the writer asks for it.

    `lazy` loads the float weight; `scaling` is "plain", "tensor" or "row" (see
    `fp8_scale`); the scale tensor is given `scale_shape` and `scale_dtype`. Either may be
    asked for first: the scale is measured once and kept (one value, or one per row). The
    reference layout puts float32 scales before fp8 weights, so a scale asked for first is
    measured on a load of its own and the values are made from a second load when their
    turn comes (holding them in between would hold every fp8 weight of the model); a writer
    that lays the scales out last (`write_safetensors(last=...)`) loads each weight once."""

    def __init__(self, name: str, lazy: LazyTensor, dtype: str, scaling: str, report: LayerClassErrors,
                 scale_shape: tuple[int, ...] = (), scale_dtype: "torch.dtype | None" = None) -> None:
        self.name, self.lazy, self.dtype, self.scaling, self.report = name, lazy, dtype, scaling, report
        self.scale_shape, self.scale_dtype = scale_shape, scale_dtype
        self._lock = threading.Lock()
        self._scale: "torch.Tensor | None" = None

    def _known_scale(self, weight: "torch.Tensor") -> "torch.Tensor":
        """The scale, measured on `weight` as stored the first time (16- and 32-bit values
        peak where their float32 copies do; float64 ones are rounded first, as they will be)."""
        import torch

        with self._lock:
            if self._scale is None:
                measured = weight.to(torch.float32) if weight.dtype == torch.float64 else weight
                self._scale = fp8_scale(measured, self.dtype, self.scaling, self.scale_dtype)
            return self._scale

    def weight(self) -> "torch.Tensor":
        """The fp8 values, made (and their error measured) a block of rows at a time, so
        that no float32 copy of the whole weight is made."""
        import torch

        weight = self.lazy.load()
        scale = self._known_scale(weight)
        values = torch.empty(weight.shape, dtype=_limits(self.dtype)[0])
        rows = weight.reshape(weight.shape[0] if weight.ndim else 1, -1)
        out, per_row = values.view(rows.shape), scale.numel() > 1
        step = max(1, _BLOCK_ELEMENTS // max(1, rows.shape[1]))
        max_abs = error_norm2 = norm2 = 0.0
        for start in range(0, rows.shape[0], step):
            block = rows[start:start + step].to(torch.float32)
            block_scale = scale[start:start + step] if per_row else scale
            out[start:start + step] = fp8_values(block, self.dtype, block_scale)
            error = scaled_values(out[start:start + step], block_scale).sub_(block)
            max_abs = max(max_abs, float(_peaks(error)) if error.numel() else 0.0)
            error_norm2 += float(error.square_().sum())
            norm2 += float(block.square().sum())
        self.report.record(self.name, max_abs, error_norm2, norm2)
        return values

    def scale(self) -> "torch.Tensor":
        with self._lock:
            known = self._scale
        if known is None:  # measured on the weight as stored: a read, no float32 copy
            known = self._known_scale(self.lazy.load())
        return known.to(self.scale_dtype or known.dtype).reshape(self.scale_shape)


def _json_tensor(value: Mapping[str, str]) -> LazyTensor:
    raw = json.dumps(dict(value), separators=(",", ":")).encode()

    def load() -> "torch.Tensor":
        import torch

        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return LazyTensor("U8", (len(raw),), load)


def _marker(dtype: str) -> LazyTensor:
    def load() -> "torch.Tensor":
        import torch

        return torch.zeros(0, dtype=_limits(dtype)[0])
    return LazyTensor(FP8_DTYPES[dtype][0], (0,), load)


def cast_fp8(tensors: Mapping[str, LazyTensor], dtype: str, scaling: str, keep: Callable[[str], bool],
             marker_prefix: str = "") -> tuple[dict[str, LazyTensor], Fp8Report, dict[str, str]]:
    """(the tensors with every matrix not kept in fp8 and its scale tensors beside it, the
    report, metadata to add). `keep(name)` says which matrices stay as they are."""
    if dtype not in FP8_DTYPES or scaling not in SCALINGS:
        raise SdkitError(f"fp8 needs a dtype of {', '.join(FP8_DTYPES)} and a scaling of {', '.join(SCALINGS)}")
    report = Fp8Report(dtype, scaling)
    code, format_name = FP8_DTYPES[dtype]
    out: dict[str, LazyTensor] = {}
    layers: dict[str, dict[str, str]] = {}
    for name, lazy in tensors.items():
        if not fp8_candidate(name, lazy):
            out[name] = lazy
            continue
        if keep(name):
            report.kept.append(name)
            out[name] = lazy
            continue
        report.cast.append(name)
        quantized = Fp8Weight(name, lazy, dtype, "plain" if scaling == "plain" else "tensor", report)
        out[name] = LazyTensor(code, lazy.shape, quantized.weight)
        layer = name[: -len(".weight")]
        if scaling == "scaled":
            out[layer + ".scale_weight"] = LazyTensor("F32", (), quantized.scale)
        elif scaling == "mixed":
            out[layer + ".weight_scale"] = LazyTensor("F32", (), quantized.scale)
            out[layer + ".comfy_quant"] = _json_tensor({"format": format_name})
            layers[layer] = {"format": format_name}
    metadata: dict[str, str] = {}
    if scaling == "scaled" and report.cast:
        out[marker_prefix + MARKER] = _marker(dtype)
    if scaling == "mixed" and layers:
        metadata[METADATA_KEY] = json.dumps({"format_version": "1.0", "layers": layers}, separators=(",", ":"))
    return out, report, metadata


def family_keep(patterns: tuple[str, ...], root: str = "") -> Callable[[str], bool]:
    """A predicate true for keys under `root` whose remaining name starts with one of the
    family's kept modules (regexes matched at the start)."""
    compiled = [re.compile(pattern) for pattern in patterns]

    def kept(name: str) -> bool:
        if root and not name.startswith(root):
            return False
        relative = name[len(root):]
        return any(regex.match(relative) for regex in compiled)
    return kept

