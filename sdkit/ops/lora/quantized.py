"""Baking into quantized bases: fp8 (plain, ComfyUI's scaled and mixed) and GGUF.

A touched weight is read as the float32 weight it stands for (fp8 values × their scale;
GGUF blocks dequantized by the reader), gets its deltas in float32 (`compute.py`), and is
stored again the way the base stored it:

- plain fp8: the same format, values beyond its range clamped to it;
- scaled fp8: a fresh per-tensor scale from the baked weight's largest |value| (the old
  one would clip a weight the delta grew, or waste range on one it shrank), written to
  the same `<layer>.scale_weight` with its shape and dtype;
- mixed (`_quantization_metadata` / `comfy_quant`): the same fp8 format, a fresh
  `<layer>.weight_scale`, one value or one per output row as the base has it;
- GGUF: the same GGML type and stored shape (a `comfy.gguf.orig_shape` reshape kept),
  quantized by sdkit's quantizers (`ops/gguf_quant.py`); the file is written again with
  every header field as it was stored, plus the recipe.

Everything untouched is copied byte for byte: the other weights, their scales, the
`scaled_fp8` marker, `comfy_quant` tensors and metadata, activation scales (`scale_input`,
`input_scale`: they describe the inputs, which a bake does not change). Touched tensors
the base stores in a plain float dtype (an fp8 file's bf16 embedders, a GGUF's F32 / F16 /
BF16 tensors) are baked as in a plain base. The error requantization leaves in each
touched quantized weight is reported per layer class, as `convert` reports fp8 / GGUF.

Refused in one line, before anything is written: mixed layers in a format sdkit does not
requantize (block-scaled or packed nvfp4 / mxfp8, int8), fp8 variants other than e4m3fn /
e5m2, a touched GGUF tensor in a type sdkit does not write, quantized bases that are not
transformer files (a diffusers folder, an SD UNet: their bake converts names), and
`--dtype` (the output keeps the base's format).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sdkit.arch.quantization import FORMATS, mixed_layer_formats
from sdkit.errors import SdkitError, with_article
from sdkit.io import LazyTensor
from sdkit.io.dtypes import CODE_TO_TORCH
from sdkit.io.gguf_reader import GgufLayout, read_gguf_layout
from sdkit.io.gguf_writer import GgufTensor, TypedField, patch_field_text, write_gguf
from sdkit.io.writer import DATA_SHA256
from sdkit.ops.fp8 import FP8_DTYPES, Fp8Weight, scaled_values
from sdkit.ops.gguf_quant import WRITABLE_TYPES, gguf_producer
from sdkit.ops.quant_error import LayerClassErrors

if TYPE_CHECKING:
    import torch

    from sdkit.ops.lora.compute import KeyBaker
    from sdkit.ops.lora.plan import OpenBase
    from sdkit.ops.recipe_meta import InputDigests

# safetensors code -> fp8 dtype name (sdkit.ops.fp8)
FP8_CODES = {code: name for name, (code, _torch_name) in FP8_DTYPES.items()}
_OTHER_FP8 = ("F8_E4M3FNUZ", "F8_E5M2FNUZ")
_SCALE = ".scale_weight"
_BAKED_F16_ADVICE = ("the base stores it as F16: bake at a lower strength, or into a GGUF converted "
                     "from a bf16 source with --quant BF16")
_REQUANTIZED_MIXED = ", ".join(name for name, fmt in FORMATS.items() if fmt.storage in FP8_CODES)


@dataclass
class RequantReport(LayerClassErrors):
    """What the bake stored back in the base's quantized format, and the error it left."""

    scheme: str  # "fp8" | "scaled-fp8" | "mixed" | "gguf"
    requantized: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "requantized": len(self.requantized), "errors": self.errors_json()}


@dataclass(frozen=True)
class Fp8Storage:
    """How one fp8 weight is stored: its format, the key of its scale (None: unscaled),
    and whether that scale is one value or one per output row."""

    dtype: str  # "fp8_e4m3fn" | "fp8_e5m2"
    scale: str | None = None
    scaling: str = "plain"  # "plain" | "tensor" | "row"


@dataclass
class QuantizedBase:
    """A quantized base: its scheme, its tensors as the bake reads them (scaled weights as
    float32 values), how its fp8 weights are stored, a GGUF base's stored layout."""

    scheme: str
    sources: dict[str, LazyTensor]
    fp8: dict[str, Fp8Storage] = field(default_factory=dict)
    layout: GgufLayout | None = None

    def requantized(self, name: str) -> bool:
        """Whether a touched key is baked in float32 and stored back quantized here."""
        return name in self.fp8 or self.layout is not None


def quantization_scheme(opened: "OpenBase") -> str | None:
    return (opened.identity.precision.quantization or {}).get("scheme")


def quantized_base(opened: "OpenBase", dtype: str | None) -> QuantizedBase | None:
    """The base's quantization as the bake handles it (None: plain weights, or plain fp8
    in a UNet, which the bake clamps into its dtype as any other); refused where the bake
    cannot store the result back in the base's format."""
    scheme = quantization_scheme(opened)
    if scheme is None or (scheme == "fp8" and opened.denoiser is None):
        return None
    path = opened.model.path
    if opened.denoiser is None or opened.view.standalone:
        raise SdkitError(f"{path}: is {opened.identity.precision.label}; sdkit bakes into quantized "
                         "transformer files only (cast it first: sdkit convert --dtype bf16)")
    if dtype is not None:
        raise SdkitError(f"{path}: is {opened.identity.precision.label}; the bake keeps a quantized base's "
                         "format, --dtype applies to bf16 / fp16 / fp32 bases")
    tensors = opened.view.tensors
    if scheme == "gguf":
        return QuantizedBase(scheme, tensors, layout=read_gguf_layout(Path(path)))
    _refuse_other_fp8(path, tensors)
    storage = _fp8_weights(path, tensors)
    if scheme == "mixed":
        storage.update(_mixed_weights(opened, tensors))
    sources = dict(tensors)
    for name, stored in storage.items():
        if stored.scale is not None:
            sources[name] = LazyTensor("F32", tensors[name].shape,
                                       partial(_scaled, tensors[name], tensors[stored.scale]), fresh=True)
    return QuantizedBase(scheme, sources, storage)


def _scaled(weight: LazyTensor, scale: LazyTensor) -> "torch.Tensor":
    return scaled_values(weight.load(), scale.load())


def _refuse_other_fp8(path: str, tensors: dict[str, LazyTensor]) -> None:
    other = [name for name, lazy in tensors.items() if lazy.dtype in _OTHER_FP8]
    if other:
        raise SdkitError(f"{path}: {other[0]} is {tensors[other[0]].dtype}; sdkit requantizes fp8 e4m3fn "
                         "and e5m2 weights only")


def _fp8_weights(path: str, tensors: dict[str, LazyTensor]) -> dict[str, Fp8Storage]:
    """The fp8 weights, with their ComfyUI `scale_weight` where they have one."""
    storage: dict[str, Fp8Storage] = {}
    for name, lazy in tensors.items():
        if not name.endswith(".weight"):
            continue
        scale = name[: -len(".weight")] + _SCALE
        if lazy.dtype in FP8_CODES:
            scaled = scale in tensors
            storage[name] = Fp8Storage(FP8_CODES[lazy.dtype], scale if scaled else None,
                                       "tensor" if scaled else "plain")
        elif scale in tensors:
            raise SdkitError(f"{path}: {scale} scales {with_article(lazy.dtype)} weight; sdkit requantizes scaled fp8 "
                             "weights only")
    return storage


def _mixed_weights(opened: "OpenBase", tensors: dict[str, LazyTensor]) -> dict[str, Fp8Storage]:
    """The layers ComfyUI's mixed precision lists, each with its `weight_scale`; any
    layer in a format other than tensor- or row-scaled fp8 refuses the base."""
    path = opened.model.path
    storage: dict[str, Fp8Storage] = {}
    for layer, fmt in mixed_layer_formats(opened.model).items():
        weight = tensors[layer + ".weight"]
        if fmt is None or fmt.storage not in FP8_CODES or fmt.block_scale or fmt.tensor_scales:
            words = fmt.words if fmt is not None else "a format sdkit does not know"
            raise SdkitError(f"{path}: layer {layer} is {words}; sdkit requantizes mixed layers in "
                             f"{_REQUANTIZED_MIXED} (tensor- or row-scaled) only")
        scale_key = f"{layer}.{fmt.row_scale}"
        scale = tensors.get(scale_key)
        if scale is None:
            raise SdkitError(f"{path}: {scale_key} is missing: {with_article(fmt.words)} layer needs it")
        per_row = len(weight.shape) > 0 and weight.shape[0] > 1 and _count(scale.shape) == weight.shape[0]
        storage[layer + ".weight"] = Fp8Storage(FP8_CODES[fmt.storage], scale_key, "row" if per_row else "tensor")
    return storage


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


# ---- safetensors output -------------------------------------------------------------------

def requantized_tensors(base: QuantizedBase, original: dict[str, LazyTensor], baker: "KeyBaker",
                        report: RequantReport) -> dict[str, LazyTensor]:
    """The output tensors under the base's names: touched fp8 weights (and their scales)
    made again in their format, other touched keys baked as in a plain base, the rest
    the base's own (their bytes copied)."""
    out: dict[str, LazyTensor] = {}
    for name in baker.codes:
        baked = LazyTensor(baker.codes[name], original[name].shape, partial(baker.compute, name))
        stored = base.fp8.get(name)
        if stored is None:
            out[name] = baked
            continue
        report.requantized.append(name)
        scale = original[stored.scale] if stored.scale else None
        weight = Fp8Weight(name, baked, stored.dtype, stored.scaling, report,
                           scale_shape=scale.shape if scale else (),
                           scale_dtype=CODE_TO_TORCH[scale.dtype] if scale else None)
        out[name] = LazyTensor(FP8_DTYPES[stored.dtype][0], original[name].shape, weight.weight)
        if scale is not None:
            out[stored.scale] = LazyTensor(scale.dtype, scale.shape, weight.scale)
    return {name: out.get(name) or lazy for name, lazy in original.items()}


def scale_owners(base: QuantizedBase) -> dict[str, str]:
    """scale key -> its weight's key: making a fresh scale costs what baking the weight does."""
    return {stored.scale: name for name, stored in base.fp8.items() if stored.scale}


# ---- GGUF output ---------------------------------------------------------------------------

def write_baked_gguf(base: QuantizedBase, baker: "KeyBaker", output: Path, metadata: dict[str, str],
                     digests: "InputDigests", report: RequantReport, *, overwrite: bool,
                     progress: Callable[[int], None] | None) -> int:
    """Write the baked GGUF: the base's fields as stored (its string fields replaced by
    `metadata`, which carries them), its tensors in its order, touched ones quantized
    again to their type. Returns the number of tensors."""
    layout = base.layout
    assert layout is not None
    planned = [_planned_tensor(stored, base, baker, report) for stored in layout.tensors]
    fields: dict[str, Any] = {f.key: TypedField(f.value, f.kind, f.item_kind) for f in layout.fields
                              if f.kind.name != "STRING"}
    fields.update({key: value for key, value in metadata.items() if value != DATA_SHA256})

    def finish(partial_file: Path, header_end: int) -> None:
        for path in dict.fromkeys(digests.paths):
            patch_field_text(partial_file, header_end, digests.placeholders[path], digests.digest(path))
    write_gguf(output, layout.architecture, fields, planned, overwrite=overwrite, progress=progress,
               finish=finish)
    return len(planned)


def gguf_string_fields(base: QuantizedBase) -> dict[str, str]:
    """A GGUF base's string fields: the metadata a bake carries over (the numbers and
    arrays are copied with their types)."""
    assert base.layout is not None
    return {f.key: f.value for f in base.layout.fields if f.kind.name == "STRING"}


def _planned_tensor(stored: Any, base: QuantizedBase, baker: "KeyBaker", report: RequantReport) -> GgufTensor:
    name = stored.name
    if name not in baker.codes:
        return GgufTensor(name, stored.shape, stored.ggml_type, lambda: stored.data)
    if stored.ggml_type not in WRITABLE_TYPES:
        raise SdkitError(f"{name}: is GGUF {stored.ggml_type.name}, which sdkit does not write; the bake "
                         "stores a touched tensor back in its own type")
    logical = base.sources[name].shape
    baked = LazyTensor("F32", logical, partial(baker.compute, name))
    quantized = stored.ggml_type.name not in ("F32", "F16", "BF16")
    if quantized:
        report.requantized.append(name)
    return GgufTensor(name, stored.shape, stored.ggml_type,
                      gguf_producer(name, baked, stored.ggml_type, stored.shape, report if quantized else None,
                                    _BAKED_F16_ADVICE))
