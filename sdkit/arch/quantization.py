"""Quantized weights: plain fp8, ComfyUI's scaled fp8 and its per-layer mixed precision.

Read from the header (and the tiny per-layer JSON tensors), and checked, so that a file
whose scales are missing or misshapen is refused in one line instead of loading as noise.

Facts from ComfyUI (read, not copied):
- scaled fp8 (`comfy/utils.py` `convert_old_quants`, `comfy/model_detection.py`): a marker
  tensor `<prefix>scaled_fp8` whose dtype names the fp8 format (float32 meaning e4m3fn; two
  elements asking for full-precision matmuls), then per layer `<layer>.scale_weight` and
  optionally `<layer>.scale_input`, one value each (`scaled_fp8_ops` makes them 0-d); a layer
  without a scale loads unscaled;
- mixed precision (`comfy/ops.py` `_load_quantized_module`, `comfy/quant_ops.py`
  `QUANT_ALGOS`): each quantized layer is named by a `<layer>.comfy_quant` uint8 tensor
  holding JSON `{"format": …}`, or by the safetensors metadata `_quantization_metadata`,
  JSON `{"layers": {layer: {"format": …}}}`; formats and their tensors below.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sdkit.errors import with_article
from sdkit.io.model_file import GGUF_QUANT_PREFIX, ModelFile, dtype_bits
from sdkit.io.safetensors_json import metadata_json

MARKER = "scaled_fp8"
METADATA_KEY = "_quantization_metadata"
_LAYER_MARKER = ".comfy_quant"
_MIXED_PREFIXES = ("", "model.diffusion_model.")  # layer names are written with or without it
_FP8 = {"F8_E4M3": "fp8 e4m3fn", "F8_E5M2": "fp8 e5m2", "F8_E4M3FNUZ": "fp8 e4m3fnuz",
        "F8_E5M2FNUZ": "fp8 e5m2fnuz"}
DTYPE_WORDS = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64", **_FP8}
_MAX_MARKER_BYTES = 4096  # a comfy_quant JSON is a few dozen bytes
# the index in a list of blocks (`double_blocks.7.`, `layers.12.`, `noise_refiner.0.`)
_BLOCK_INDEX = re.compile(r"(blocks|layers|refiner)\.\d+\.")


@dataclass(frozen=True)
class QuantFormat:
    """A ComfyUI per-layer format: how the weight is stored and which scales it needs."""

    storage: str  # safetensors dtype code of `<layer>.weight`
    words: str
    tensor_scales: tuple[str, ...] = ()  # one value each
    block_scale: str | None = None  # `[>= out, >= in / block]`, padded layouts allowed
    block: int = 0
    packing: int = 1  # values per stored element (nvfp4 packs two 4-bit values in a byte)
    row_scale: str | None = None  # one value, or one per output row


FORMATS = {
    "float8_e4m3fn": QuantFormat("F8_E4M3", "fp8 e4m3fn", row_scale="weight_scale"),
    "float8_e5m2": QuantFormat("F8_E5M2", "fp8 e5m2", row_scale="weight_scale"),
    "nvfp4": QuantFormat("U8", "nvfp4", tensor_scales=("weight_scale_2",), block_scale="weight_scale",
                         block=16, packing=2),
    "mxfp8": QuantFormat("F8_E4M3", "mxfp8", block_scale="weight_scale", block=32),
    "int8_tensorwise": QuantFormat("I8", "int8", row_scale="weight_scale"),
}


@dataclass
class QuantScan:
    """What a file's quantization is, and what is wrong with it."""

    scheme: str | None = None  # None | "fp8" | "scaled-fp8" | "mixed" | "gguf"
    formats: Counter[str] = field(default_factory=Counter)  # format words -> layers
    markers: list[str] = field(default_factory=list)
    scaled_layers: int = 0
    problems: list[str] = field(default_factory=list)  # each makes the file unusable
    notes: list[str] = field(default_factory=list)
    logical_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # unpacked weights
    rest_dtype: str | None = None  # mixed: the dtype most parameters outside the listed layers have
    bits_per_weight: float | None = None  # gguf: stored bits over all parameters
    layer_classes: dict[str, list[str]] = field(default_factory=dict)  # stored type -> layer classes

    def to_facts(self) -> dict[str, Any] | None:
        if self.scheme is None:
            return None
        facts = {"scheme": self.scheme, "formats": dict(self.formats), "markers": self.markers,
                 "scaled_layers": self.scaled_layers}
        if self.bits_per_weight is not None:
            facts["bits_per_weight"] = round(self.bits_per_weight, 2)
        if self.layer_classes:
            facts["layer_classes"] = self.layer_classes
        return facts

    def label(self, dominant: str | None) -> str:
        """The precision in words: "bf16", "fp8 e4m3fn scaled", "mixed: 180 nvfp4 …"."""
        plain = DTYPE_WORDS.get(dominant or "", (dominant or "unknown").lower())
        if self.scheme == "gguf":  # the block-quantized types, else the plain one
            quantized = [words for words in self.formats if words not in DTYPE_WORDS] or list(self.formats)[:1]
            return "GGUF " + " + ".join(quantized)
        if self.scheme == "scaled-fp8":
            return " + ".join(f"{words} scaled" for words in self.formats)
        if self.scheme == "mixed":
            plain = DTYPE_WORDS.get(self.rest_dtype or "", (self.rest_dtype or "unknown").lower())
            layers = " + ".join(f"{n} {words}" for words, n in self.formats.most_common())
            return f"mixed: {layers} layers, rest {plain}"
        return plain


def scan_quantization(model: ModelFile) -> QuantScan:
    scan = _scan_scheme(model)
    if scan.scheme is not None:
        scan.layer_classes = _layer_class_types(model, scan)
    return scan


def _scan_scheme(model: ModelFile) -> QuantScan:
    scan = QuantScan()
    if model.format == "gguf":
        _scan_gguf(model, scan)
        return scan
    layers = _mixed_layers(model, scan)
    if layers:
        scan.scheme = "mixed"
        for layer, config in layers.items():
            _check_mixed_layer(model, layer, config, scan)
        scan.rest_dtype = _dominant_outside(model, layers)
        return scan
    markers = [name for name in model.infos if name == MARKER or name.endswith("." + MARKER)]
    if markers or any(name.endswith(".scale_weight") for name in model.infos):
        scan.scheme = "scaled-fp8"
        _check_scaled(model, markers, scan)
        return scan
    if any(info.dtype in _FP8 for info in model.infos.values()):
        scan.scheme = "fp8"
    return scan


def layer_class(name: str) -> str:
    """A tensor's layer with its block number as N: that layer in every block
    (`double_blocks.N.img_mlp.0`); numbers inside a block stay, they name sublayers."""
    return _BLOCK_INDEX.sub(r"\1.N.", name.rsplit(".", 1)[0] + ".", count=1)[:-1]


def _layer_class_types(model: ModelFile, scan: QuantScan) -> dict[str, list[str]]:
    """Stored type -> the layer classes whose weight matrices all have it (a class whose
    blocks differ is listed under each of its types)."""
    mixed = {layer: config for layer, config in _mixed_layers(model, QuantScan()).items()} \
        if scan.scheme == "mixed" else {}
    types: dict[str, set[str]] = {}
    for name, info in model.infos.items():
        if not name.endswith(".weight") or len(info.shape) < 2:
            continue
        layer = name[: -len(".weight")]
        types.setdefault(_stored_type(model, layer, info.dtype, mixed), set()).add(layer_class(name))
    return {words: sorted(classes) for words, classes in sorted(types.items())}


def _stored_type(model: ModelFile, layer: str, dtype: str, mixed: dict[str, dict[str, Any]]) -> str:
    for prefix in _MIXED_PREFIXES:
        if layer.startswith(prefix) and layer[len(prefix):] in mixed:
            name = str(mixed[layer[len(prefix):]].get("format"))
            return FORMATS[name].words if name in FORMATS else name
    if layer + ".scale_weight" in model.infos:
        return f"{_FP8.get(dtype, dtype)} scaled"
    return DTYPE_WORDS.get(dtype, _gguf_type(dtype))


# ---- GGUF (ComfyUI-GGUF) --------------------------------------------------------------------

def _scan_gguf(model: ModelFile, scan: QuantScan) -> None:
    """Quant types by the parameters they hold, most first; ComfyUI-GGUF keeps 1-D
    tensors and small inputs in F32/F16, which count among the types too."""
    parameters: Counter[str] = Counter()
    stored_bits = 0.0
    for info in model.infos.values():
        parameters[_gguf_type(info.dtype)] += info.numel
        stored_bits += info.numel * dtype_bits(info.dtype)
    scan.scheme = "gguf"
    for words, _ in parameters.most_common():
        scan.formats[words] = sum(1 for info in model.infos.values() if _gguf_type(info.dtype) == words)
    total = sum(parameters.values())
    scan.bits_per_weight = stored_bits / total if total else None


def _gguf_type(dtype: str) -> str:
    return dtype[len(GGUF_QUANT_PREFIX):] if dtype.startswith(GGUF_QUANT_PREFIX) else dtype


# ---- ComfyUI mixed precision ------------------------------------------------------------

def _mixed_layers(model: ModelFile, scan: QuantScan) -> dict[str, dict[str, Any]]:
    """Layer -> its JSON config, from the metadata or the per-layer marker tensors."""
    layers: dict[str, dict[str, Any]] = {}
    raw = model.metadata.get(METADATA_KEY)
    if raw is not None:
        scan.markers.append(f"metadata {METADATA_KEY}")
        parsed = metadata_json(raw)
        listed = parsed.get("layers") if isinstance(parsed, dict) else None
        if not isinstance(listed, dict):
            scan.problems.append(f"metadata {METADATA_KEY} is not JSON of the form "
                                 '{"layers": {layer: {"format": …}}}')
            return {"": {}}
        layers.update({_stored_layer(model, str(k)): v if isinstance(v, dict) else {"format": v}
                       for k, v in listed.items()})
    for name in model.infos:
        if name.endswith(_LAYER_MARKER):
            layers.setdefault(name[: -len(_LAYER_MARKER)], _marker_config(model, name, scan))
    if layers and raw is None:
        scan.markers.append(f"*{_LAYER_MARKER} tensors")
    return layers


def _stored_layer(model: ModelFile, layer: str) -> str:
    """A layer named as the file's keys name it: metadata may list it without the root
    prefix that the keys (and their per-layer markers) carry."""
    return next((p + layer for p in _MIXED_PREFIXES if p + layer + ".weight" in model.infos), layer)


def mixed_layer_formats(model: ModelFile) -> dict[str, QuantFormat | None]:
    """Each listed layer of a ComfyUI mixed-precision file (named as its keys are, with the
    root prefix where the file has one) -> its format, None for a format sdkit does not know."""
    layers = _mixed_layers(model, QuantScan())
    found: dict[str, QuantFormat | None] = {}
    for layer, config in layers.items():
        prefix = next((p for p in _MIXED_PREFIXES if p + layer + ".weight" in model.infos), None)
        if prefix is not None:
            found[prefix + layer] = FORMATS.get(str(config.get("format")))
    return found


def _dominant_outside(model: ModelFile, layers: dict[str, dict[str, Any]]) -> str | None:
    """The dtype holding most parameters among tensors of no listed layer."""
    listed = {prefix + layer + "." for layer in layers for prefix in _MIXED_PREFIXES}
    counts: Counter[str] = Counter()
    for name, info in model.infos.items():
        if name[: name.rfind(".") + 1] not in listed:
            counts[info.dtype] += info.numel
    return counts.most_common(1)[0][0] if counts else None


def _marker_config(model: ModelFile, name: str, scan: QuantScan) -> dict[str, Any]:
    info = model.infos[name]
    if info.dtype != "U8" or len(info.shape) != 1 or info.numel > _MAX_MARKER_BYTES:
        scan.problems.append(f"{name} is {info.dtype} {list(info.shape)}; expected a short U8 "
                             "vector of JSON")
        return {}
    try:
        value = json.loads(_tensor_bytes(model, name))
    except ValueError:
        value = None
    if not isinstance(value, dict):
        scan.problems.append(f"{name} does not hold a JSON object")
        return {}
    return value


def _tensor_bytes(model: ModelFile, name: str) -> bytes:
    """A small tensor's raw bytes: read from the file where it has them (no torch)."""
    span = model.span(name)
    if span is not None:
        from sdkit.io.byte_span import read_into

        raw = bytearray(span.length)
        read_into(span, 0, memoryview(raw))
        return bytes(raw)
    return model.load(name).numpy().tobytes()


def _check_mixed_layer(model: ModelFile, layer: str, config: dict[str, Any], scan: QuantScan) -> None:
    if not layer:
        return  # the metadata itself was refused
    name = str(config.get("format"))
    prefix = next((p for p in _MIXED_PREFIXES if p + layer + ".weight" in model.infos), None)
    if prefix is None:
        scan.problems.append(f"{layer}: listed as {name} but the file has no {layer}.weight")
        return
    fmt = FORMATS.get(name)
    if fmt is None:
        scan.formats[name] += 1
        scan.notes.append(f"{layer}: quantization format {name!r} sdkit does not know")
        return
    scan.formats[fmt.words] += 1
    full = prefix + layer
    weight = model.infos[full + ".weight"]
    if weight.dtype != fmt.storage:
        scan.problems.append(f"{full}.weight is {weight.dtype}; {name} weights are {fmt.storage}")
        return
    out, width = (weight.shape[0], weight.shape[-1] * fmt.packing) if weight.shape else (0, 0)
    if fmt.packing > 1 and len(weight.shape) == 2:
        scan.logical_shapes[full + ".weight"] = (out, width)
    _check_layer_scales(model, full, name, fmt, out, width, scan)


def _check_layer_scales(model: ModelFile, full: str, name: str, fmt: QuantFormat, out: int,
                        width: int, scan: QuantScan) -> None:
    for scale in fmt.tensor_scales:
        _check_one_value(model, f"{full}.{scale}", f"{name} weight", scan, required=True)
    if fmt.row_scale:
        shape = _scale_shape(model, f"{full}.{fmt.row_scale}", name, scan)
        if shape is not None and _count(shape) not in (1, out):
            scan.problems.append(f"{full}.{fmt.row_scale} has shape {list(shape)}; expected one value "
                                 f"or one per output row ({out})")
    if fmt.block_scale:
        shape = _scale_shape(model, f"{full}.{fmt.block_scale}", name, scan)
        blocks = -(-width // fmt.block)
        if shape is not None and (len(shape) != 2 or shape[0] < out or shape[1] < blocks):
            scan.problems.append(f"{full}.{fmt.block_scale} has shape {list(shape)}; expected "
                                 f"[{out}, {blocks}] block scales (one per {fmt.block} values) or a "
                                 "padded layout of at least that")
    _check_one_value(model, f"{full}.input_scale", f"{name} input", scan, required=False)


def _scale_shape(model: ModelFile, key: str, name: str, scan: QuantScan) -> tuple[int, ...] | None:
    shape = model.shape(key)
    if shape is None:
        scan.problems.append(f"{key} is missing: {with_article(name)} weight needs it")
    return shape


# ---- ComfyUI scaled fp8 -------------------------------------------------------------------

def _check_scaled(model: ModelFile, markers: list[str], scan: QuantScan) -> None:
    scan.markers = markers
    prefixes = [m[: -len(MARKER)] for m in markers] or [""]
    formats = {m[: -len(MARKER)]: _marker_format(model.infos[m].dtype) for m in markers}
    scales = [n for n in model.infos if n.endswith(".scale_weight")]
    if not markers:
        scan.notes.append(f"{len(scales)} *.scale_weight tensors but no {MARKER} marker: ComfyUI "
                          "reads such weights unscaled")
    for prefix in prefixes:
        mine = [n for n in scales if n.startswith(prefix)]
        if not mine:
            scan.problems.append(f"{prefix}{MARKER} marks scaled fp8 weights but the file holds no "
                                 f"{prefix}*.scale_weight; expected one per fp8 weight")
    for name in scales:
        _check_scaled_layer(model, name[: -len(".scale_weight")], scan)
    for prefix, words in formats.items():
        scan.formats[words] += sum(1 for n in scales if n.startswith(prefix))
    if not formats:
        scan.formats[_FP8.get(_dominant_fp8(model), "fp8")] += len(scales)
    _note_unscaled(model, prefixes, scan)


def _marker_format(dtype: str) -> str:
    return _FP8.get(dtype, "fp8 e4m3fn")  # ComfyUI reads a float32 marker as e4m3fn


def _check_scaled_layer(model: ModelFile, layer: str, scan: QuantScan) -> None:
    weight = model.infos.get(layer + ".weight")
    if weight is None:
        scan.problems.append(f"{layer}.scale_weight scales no weight: the file has no {layer}.weight")
        return
    if weight.dtype not in _FP8:
        scan.problems.append(f"{layer}.scale_weight scales {with_article(weight.dtype)} weight; expected an fp8 one")
        return
    scan.scaled_layers += 1
    _check_one_value(model, layer + ".scale_weight", "scaled fp8 weight", scan, required=True)
    _check_one_value(model, layer + ".scale_input", "scaled fp8 input", scan, required=False)


def _note_unscaled(model: ModelFile, prefixes: list[str], scan: QuantScan) -> None:
    unscaled = [n for n, info in model.infos.items()
                if info.dtype in _FP8 and n.endswith(".weight") and any(n.startswith(p) for p in prefixes)
                and n[: -len(".weight")] + ".scale_weight" not in model.infos]
    if unscaled:
        scan.notes.append(f"{len(unscaled)} fp8 weights carry no scale_weight (read with scale 1, as "
                          f"ComfyUI does), e.g. {unscaled[0]}")


def _dominant_fp8(model: ModelFile) -> str:
    counts = Counter(info.dtype for info in model.infos.values() if info.dtype in _FP8)
    return counts.most_common(1)[0][0] if counts else ""


# ---- shared checks --------------------------------------------------------------------------

def _check_one_value(model: ModelFile, key: str, what: str, scan: QuantScan, *, required: bool) -> None:
    info = model.infos.get(key)
    if info is None:
        if required:
            scan.problems.append(f"{key} is missing: {with_article(what)} needs one scale")
        return
    if info.dtype not in ("F32", "F16", "BF16", "F64"):
        scan.problems.append(f"{key} is {info.dtype}; expected a float scale")
    elif _count(info.shape) != 1:
        scan.problems.append(f"{key} has shape {list(info.shape)}; expected one value ([] or [1]) "
                             f"per {what}")


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
