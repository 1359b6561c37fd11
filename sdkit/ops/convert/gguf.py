"""`sdkit convert MODEL --to gguf --quant TYPE`: a diffusion model as ComfyUI-GGUF loads it.

ComfyUI-GGUF (city96/ComfyUI-GGUF) makes its files in two steps: `tools/convert.py`
writes an F16/BF16 GGUF, then a patched `llama-quantize` (`tools/lcpp.patch`) quantizes
it. This module does both in one streaming pass and follows their rules:

- names: the lone diffusion model in single-file / ComfyUI names, without
  `model.diffusion_model.` (convert.py strips it). A diffusers-named transformer is renamed
  through its family's key map first; an SD1/SDXL UNet is written in LDM names (from a
  checkpoint, its UNet alone).
- header: `general.architecture` (the family's `gguf_architecture`, the string
  convert.py's detection gives and the loader's IMG_ARCH_LIST accepts),
  `general.quantization_version` (GGML_QUANT_VERSION) and `general.file_type`
  (llama.cpp's LlamaFileType of the chosen type; the "_S" one for K-quants).
- what stays in high precision (convert.py): from float32/bfloat16 sources, 1-D tensors,
  tensors of at most 1024 values and the arch's `keys_hiprec` go to F32; other tensors
  not quantized keep 16 bits (BF16 from a BF16 source or with --quant BF16, else F16).
- what is quantized (lcpp.patch): 2-D tensors whose name ends in "weight", except the
  arch's list of embedders and final layers (substring matches, as the patch's
  `name.find`); a row that does not fill whole blocks falls back to F16 (the patch's
  fallback, and convert.py's on a QuantError).
- shapes: GGUF stores dims reversed. For sd1/sdxl (convert.py's `shape_fix`) a tensor of
  more than one dim, at least 512 values, a multiple of 256 values and a last dim that is
  not, is stored as (n/256, 256) with its shape in `comfy.gguf.orig_shape.<name>` (an
  ARRAY of INT32, which the loader's `get_orig_shape` requires). Tensors of more than 4
  dims (Wan's 3-D patch embedding) go in F32 with all their dims, as
  `tools/fix_5d_tensors.py` adds them back; the loader reads them by their reversed dims.

Each quantized tensor is dequantized again (`gguf.quants.dequantize`) to measure its error
against the source; the report gives it per layer class, as for fp8.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from sdkit.arch.families import FAMILIES
from sdkit.errors import SdkitError, with_article
from sdkit.io import LazyTensor
from sdkit.io.gguf_writer import GgufTensor, patch_field_text, write_gguf
from sdkit.io.writer import DATA_SHA256
from sdkit.ops.convert.model import ModelConversion
from sdkit.ops.convert.transformer import TransformerConversion
from sdkit.ops.gguf_quant import gguf_producer
from sdkit.ops.quant_error import LayerClassErrors
from sdkit.ops.precision import key_matcher
from sdkit.ops.recipe_meta import SpecFacts, build_metadata

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
QUANT_TYPES = ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K")
FILE_TYPES = {"F16": F.MOSTLY_F16, "BF16": F.MOSTLY_BF16, "Q8_0": F.MOSTLY_Q8_0, "Q6_K": F.MOSTLY_Q6_K,
              "Q5_K": F.MOSTLY_Q5_K_S, "Q5_1": F.MOSTLY_Q5_1, "Q5_0": F.MOSTLY_Q5_0, "Q4_K": F.MOSTLY_Q4_K_S,
              "Q4_1": F.MOSTLY_Q4_1, "Q4_0": F.MOSTLY_Q4_0, "Q3_K": F.MOSTLY_Q3_K_S, "Q2_K": F.MOSTLY_Q2_K}
SMALL = 1024  # convert.py's QUANTIZATION_THRESHOLD
_RESHAPE_MIN = 512  # convert.py's REARRANGE_THRESHOLD
_HIGH_SOURCES = ("F32", "F64", "BF16")  # convert.py's float32 / bfloat16 sources
_INTEGERS = {"I8": Q.I8, "I16": Q.I16, "I32": Q.I32, "I64": Q.I64}


@dataclass(frozen=True)
class ArchRules:
    """One `general.architecture`'s rules: convert.py's `shape_fix` and `keys_hiprec`
    (to F32), lcpp.patch's names left unquantized (substrings, and whole names)."""

    shape_fix: bool = False
    high_precision: tuple[str, ...] = ()
    unquantized: tuple[str, ...] = ()
    unquantized_names: tuple[str, ...] = ()

    def keeps_f32(self, name: str) -> bool:
        return any(part in name for part in self.high_precision)

    def leaves(self, name: str) -> bool:
        return name in self.unquantized_names or any(part in name for part in self.unquantized)


_FLUX_KEPT = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
_SD_KEPT = ("class_embedding.", "time_embedding.", "add_embedding.", "time_embed.", "label_emb.", "conv_in.",
            "conv_out.")
ARCH_RULES = {
    "flux": ArchRules(unquantized=_FLUX_KEPT),
    "sd1": ArchRules(shape_fix=True, unquantized=_SD_KEPT, unquantized_names=("input_blocks.0.0.weight",
                                                                            "out.2.weight")),
    "sdxl": ArchRules(shape_fix=True, unquantized=_SD_KEPT, unquantized_names=("input_blocks.0.0.weight",
                                                                             "out.2.weight")),
    "sd3": ArchRules(unquantized=("final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.",
                                  "y_embedder.", "x_embedder."), unquantized_names=("proj_out.weight", "pos_embed")),
    "wan": ArchRules(high_precision=(".modulation",),
                     unquantized=("modulation.", "patch_embedding.", "text_embedding.", "time_projection.",
                                  "time_embedding.", "img_emb.", "head.")),
    "hidream": ArchRules(high_precision=(".ff_i.gate.weight", "img_emb.emb_pos"),
                         unquantized=("p_embedder.", "t_embedder.", "x_embedder.", "final_layer.", ".ff_i.gate.weight",
                                      "caption_projection.")),
    "lumina2": ArchRules(unquantized=("t_embedder.", "x_embedder.", "final_layer.", "cap_embedder.",
                                      "context_refiner.", "noise_refiner.")),
    # no rules in lcpp.patch: the family's fp8 keep list stands in (see `_rules`)
    "qwen_image": ArchRules(),
}
SUPPORTED = sorted({name for name, family in FAMILIES.items() if family.gguf_architecture in ARCH_RULES})


@dataclass
class GgufReport(LayerClassErrors):
    """What a GGUF conversion stored how, and the quantization error per layer class."""

    quant: str
    architecture: str
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, list[str]] = field(default_factory=dict)  # reason -> tensors
    reshaped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"quant": self.quant, "architecture": self.architecture, "quantized": len(self.quantized),
                "kept": {reason: names for reason, names in sorted(self.kept.items())},
                "reshaped": self.reshaped, "errors": self.errors_json()}


@dataclass(frozen=True)
class _Choice:
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # as stored
    original: tuple[int, ...] | None  # when reshaped
    kept: str | None  # why not quantized, if it is not


def _count(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _reshaped(shape: tuple[int, ...], rules: ArchRules) -> tuple[int, ...] | None:
    count = _count(shape)
    if rules.shape_fix and len(shape) > 1 and count >= _RESHAPE_MIN and count % 256 == 0 and shape[-1] % 256:
        return (count // 256, 256)
    return None


def choose(name: str, lazy: LazyTensor, quant: str, rules: ArchRules, keep: Callable[[str], bool]) -> _Choice:
    """How one tensor is stored (see the module docstring for whose rule each is)."""
    shape = tuple(lazy.shape)
    if lazy.dtype in _INTEGERS:
        return _Choice(_INTEGERS[lazy.dtype], shape, None, "integer")
    if len(shape) > 4:
        return _Choice(Q.F32, shape, None, "more than 4 dims")
    high = lazy.dtype in _HIGH_SOURCES or lazy.dtype.startswith("GGUF_")
    if high and (len(shape) <= 1 or _count(shape) <= SMALL or rules.keeps_f32(name)):
        return _Choice(Q.F32, shape, None, "vector" if len(shape) <= 1 else
                       "small" if _count(shape) <= SMALL else "architecture (F32)")
    sixteen = Q.BF16 if lazy.dtype == "BF16" or quant == "BF16" else Q.F16
    stored = _reshaped(shape, rules)
    original = shape if stored else None
    stored = stored or shape
    reason = _kept_reason(name, stored, rules, keep)
    if reason is not None:
        return _Choice(sixteen, stored, original, reason)
    target = Q[quant]
    if stored[-1] % gguf.GGML_QUANT_SIZES[target][0]:
        return _Choice(Q.F16, stored, original, "rows do not fill blocks")
    return _Choice(target, stored, original, None)


def _kept_reason(name: str, stored: tuple[int, ...], rules: ArchRules, keep: Callable[[str], bool]) -> str | None:
    if len(stored) != 2 or not name.endswith("weight"):
        return "not a 2-D weight"
    if _count(stored) <= SMALL:
        return "small"
    if keep(name):
        return "--keep"
    if rules.leaves(name):
        return "architecture"
    return None


def _producer(name: str, lazy: LazyTensor, choice: _Choice, report: GgufReport) -> Callable[[], np.ndarray]:
    if choice.kept == "integer":
        return lambda: lazy.load().contiguous().numpy()
    return gguf_producer(name, lazy, choice.ggml_type, choice.shape, report if choice.kept is None else None)


def _rules(family_name: str) -> tuple[str, ArchRules]:
    family = FAMILIES.get(family_name)
    architecture = family.gguf_architecture if family else None
    if architecture not in ARCH_RULES:
        raise SdkitError(f"ComfyUI-GGUF has no architecture for {family_name} models; --to gguf writes "
                         f"{', '.join(SUPPORTED)} diffusion models")
    return architecture, ARCH_RULES[architecture]


class _GgufOutput:
    """What both conversions below share: the planned tensors written as GGUF."""

    model: Any
    identity: Any
    output: Path
    options: Any
    progress: Any
    input_hash: Any
    result: Any
    gguf_options: Any

    def _plain_values(self, tensors: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
        """Scaled fp8 weights as their values (the scales have no place in GGUF)."""
        scheme = (self.identity.precision.quantization or {}).get("scheme")
        if scheme != "scaled-fp8":
            return tensors
        from sdkit.ops.convert.dequantize import dequantize_scaled_fp8

        plain, scaled = dequantize_scaled_fp8(tensors)
        self.result.notes.append(f"{scaled} scaled fp8 weights multiplied by their scales; scale tensors and "
                                 "the scaled_fp8 marker left out")
        return plain

    def _write(self, view: Any, converted: Any, outputs: dict[str, LazyTensor],
               sources: dict[str, list[str]]) -> None:
        quant = self.gguf_options.quant
        architecture, rules = _rules(self.result.family)
        family_keep = self._family_keep(architecture)
        user = key_matcher(self.gguf_options.keep_fp32)
        keep = lambda name: any(user(candidate) for candidate in sources.get(name, [name]))  # noqa: E731
        report = GgufReport(quant, architecture)
        fields: dict[str, Any] = {"general.quantization_version": gguf.GGML_QUANT_VERSION,
                                  "general.file_type": int(FILE_TYPES[quant])}
        planned = []
        for name, lazy in sorted(outputs.items()):
            choice = choose(name, lazy, quant, rules, lambda key: keep(key) or family_keep(key))
            if choice.kept is None:
                report.quantized.append(name)
            else:
                report.kept.setdefault(choice.kept, []).append(name)
            if choice.original is not None:
                report.reshaped.append(name)
                fields[f"comfy.gguf.orig_shape.{name}"] = [int(dim) for dim in choice.original]
            planned.append(GgufTensor(name, choice.shape, choice.ggml_type, _producer(name, lazy, choice, report)))
        metadata = {key: value for key, value in self._recipe().items() if value != DATA_SHA256}
        fields.update(metadata)

        def finish(partial: Path, header_end: int) -> None:
            patch_field_text(partial, header_end, self.input_hash.placeholder, self.input_hash.digest())
        write_gguf(self.output, architecture, fields, planned, overwrite=self.gguf_options.force,
                   progress=self.progress, finish=finish)
        self.result.gguf = report
        self.result.tensors = len(planned)
        self.result.bytes = self.output.stat().st_size

    def _family_keep(self, architecture: str) -> Callable[[str], bool]:
        """For an arch without lcpp.patch rules (qwen_image), the family's fp8 keep list."""
        rules = ARCH_RULES[architecture]
        family = FAMILIES.get(self.result.family)
        if rules.unquantized or rules.unquantized_names or family is None or not family.fp8_keep:
            return lambda name: False
        from sdkit.ops.fp8 import family_keep

        return family_keep(family.fp8_keep)

    def _recipe(self) -> dict[str, str]:
        facts = SpecFacts.from_identity(self.identity)
        return build_metadata("convert", [self.model.path], self.gguf_options.to_json(), facts,
                              title=self.output.stem, carried={},
                              hashes={str(self.model.path): self.input_hash.placeholder})


class GgufTransformerConversion(_GgufOutput, TransformerConversion):
    """A lone transformer (FLUX, SD3, Wan, …) in single-file names, to GGUF."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gguf_options = self.options
        self.options = replace(self.options, to="single-file")

    def _refuse_packed(self) -> None:
        scheme = (self.identity.precision.quantization or {}).get("scheme")
        if scheme == "mixed":
            raise SdkitError(f"{self.model.path}: is mixed-quantized; sdkit writes GGUF from plain, scaled fp8 "
                             "or GGUF weights")


class GgufUnetConversion(_GgufOutput, ModelConversion):
    """An SD1/SDXL UNet (alone, in a checkpoint or a diffusers folder) in LDM names, to GGUF."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gguf_options = self.options
        self.options = replace(self.options, to="single-file", only="unet")

    def _target_convention(self, view: Any) -> str:
        return "ldm"


def convert_to_gguf(model: Any, identity: Any, output: Path, options: Any, progress: Any,
                    input_hash: Any) -> Any:
    """Write the diffusion model of `model` to `output` as GGUF (`options.quant`)."""
    if output.suffix.lower() != ".gguf":
        raise SdkitError(f"{output}: a GGUF output is a .gguf file")
    _refuse_non_denoisers(model, identity)
    _rules(identity.family)
    if identity.components == ["transformer"]:
        return GgufTransformerConversion(model, identity, output, options, progress, input_hash).run()
    if "unet" in identity.components:
        return GgufUnetConversion(model, identity, output, options, progress, input_hash).run()
    raise SdkitError(f"{model.path}: holds no diffusion model to write as GGUF")


def _refuse_non_denoisers(model: Any, identity: Any) -> None:
    if identity.kind in ("unet", "checkpoint") and identity.family != "unknown":
        return
    what = with_article(identity.part or identity.kind.replace("-", " "))
    raise SdkitError(f"{model.path}: is {what}; --to gguf writes diffusion models as ComfyUI-GGUF loads them "
                     f"({', '.join(SUPPORTED)})")
