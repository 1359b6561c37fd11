"""LoRA extraction from two transformer denoisers (FLUX.1 / FLUX.2, Chroma, SD3.x, Z-Image,
Qwen-Image, Wan, HiDream, Lumina 2): `tuned − base`, layer by layer.

- Each input is read in its own key convention (single-file or diffusers, alone or under
  a checkpoint / folder root) and every layer is seen as the single-file tensor: diffusers'
  q, k, v (and FLUX's MLP input) stacked as the fused `qkv` / `linear1`, a modulation whose
  halves diffusers stores the other way round put back in the single-file order. The two
  models may be in different conventions and dtypes; fp8 weights (plain, ComfyUI's scaled
  and tensor / row-scaled mixed ones) are read as the values they stand for, GGUF blocks
  as the reader dequantizes them.
- The layers factorised are the matrices of the repeated blocks (the block lists the
  family's layouts count), as sd-scripts' `flux_extract_lora.py` takes the double and
  single blocks' Linear weights, and its LoRA networks (`lora_flux`, `lora_sd3`,
  `lora_lumina`) adapt the blocks by default. Each delta is factorised by
  `sdkit.ops.lora.svd` (fixed or dynamic rank, clamp, randomized), alpha = rank.
- With `full_diff`, what else differs is kept whole, as ComfyUI loads it: the blocks'
  biases as `diff_b` beside their LoRA, the other weights (embedders, final layer, norms)
  as `diff` / `diff_b` modules.
- The text encoders an all-in-one checkpoint holds beside the denoiser (ComfyUI's
  `text_encoders.clip_l.transformer.`, `…t5xxl…`, `…clip_g…`) are extracted too, the
  layers sd-scripts' networks adapt in them (CLIP's attention and MLP, T5's attention
  and feed-forward), under kohya's names `lora_te1_` / `lora_te2_` / `lora_te3_` (as
  `lora_flux` / `lora_sd3` name CLIP-L, CLIP-G and T5-XXL in every family); an encoder
  whose weights differ by no more than `min_diff` anywhere is left out, as sd-scripts
  leaves out unchanged text encoders.
- The output is written in a client's layout (`sdkit.adapters.transformer_lora`): fused
  layers stay one module in the single-file layouts (comfyui, kohya) and are cut exactly by
  rows into their parts for diffusers (the up factor's rows, the down factor shared), so
  every layout carries the same delta.

Refused before anything is computed: a tuned model of another family, and the first layer
whose shape differs or which one model lacks.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdkit.adapters.lora_export import (
    ExportModule,
    LoraFacts,
    addnet_hashes,
    network_metadata,
)
from sdkit.adapters.lora_format import parse_lora
from sdkit.adapters.transformer_lora import (
    LAYOUTS,
    TEXT_ARCHITECTURES,
    LayerPlace,
    PlaceIndex,
    place_index,
    text_name,
    unet_name,
)
from sdkit.adapters.transformer_names import encoder_targets, find_denoiser
from sdkit.arch import identify
from sdkit.arch.families.spec import Family
from sdkit.arch.fingerprint import LayoutMatch
from sdkit.errors import SdkitError, with_article
from sdkit.io import LazyTensor, lazy_tensors, open_model, write_safetensors
from sdkit.ops.convert.dequantize import plain_values
from sdkit.ops.convert.lora import adapter_metadata
from sdkit.ops.lora.convert import layout_tensors
from sdkit.ops.lora.extract import (
    HeldFactors,
    extract_layers,
    factorised_layer,
    params_of,
)
from sdkit.ops.lora.svd import Factors
from sdkit.ops.recipe_meta import DIFFUSERS_IMPLEMENTATION, SpecFacts, build_metadata

if TYPE_CHECKING:
    import torch

    from sdkit.ops.lora.extract import ExtractOptions, SvdReport

Progress = Callable[[int], None]
DEFAULT_LAYOUT = "comfyui"  # ComfyUI's own name for a weight of any model (`diffusion_model.<path>`)
_PARAMS = (".weight", ".bias")
_PLAIN_DTYPES = ("F16", "BF16", "F32")
_CHECKED_LAYERS = 1  # layers a randomized extract compares with the full SVD
# the text-encoder layers sd-scripts' networks adapt: CLIP's `CLIPAttention` / `CLIPMLP`,
# T5's `T5Attention` / `T5DenseGatedActDense` Linear layers
_TEXT_LAYER = re.compile(r"(^|\.)(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]|SelfAttention\.[qkvo]|"
                         r"DenseReluDense\.(wi_0|wi_1|wi|wo))$")


@dataclass
class Denoiser:
    """One input's transformer denoiser: its tensors as plain values, where they sit, and
    the layout they are named in."""

    path: str
    tensors: dict[str, LazyTensor]
    root: str
    match: LayoutMatch

    @property
    def convention(self) -> str:
        return self.match.layout.convention

    def names(self, place: LayerPlace, param: str) -> tuple[str, ...]:
        """The tensors of `place` in this model's own names."""
        paths = (place.ldm,) if self.convention == "ldm" or place.parts == (place.ldm,) else place.parts
        return tuple(self.root + path + param for path in paths)

    def shape(self, place: LayerPlace, param: str) -> tuple[int, ...] | None:
        """The single-file tensor's shape (None where the model lacks it)."""
        found = [self.tensors.get(name) for name in self.names(place, param)]
        if any(lazy is None for lazy in found):
            return None
        return (sum(lazy.shape[0] for lazy in found), *found[0].shape[1:]) if len(found) > 1 else found[0].shape

    def load(self, place: LayerPlace, param: str) -> torch.Tensor:
        """The single-file tensor in float32, always a fresh buffer."""
        import torch

        stored = self.stored(place, param)
        return stored.to(torch.float32, copy=True)

    def stored(self, place: LayerPlace, param: str) -> torch.Tensor:
        """The single-file tensor in its stored dtype (a view of the file where it can be):
        parts stacked by rows, a diffusers-order modulation put back in the single-file order."""
        import torch

        parts = [self.tensors[name].load() for name in self.names(place, param)]
        if len(parts) > 1:
            return torch.cat(parts)
        if place.kind == "swap" and self.convention == "diffusers":
            half = parts[0].shape[0] // 2
            return torch.cat([parts[0][half:], parts[0][:half]])
        return parts[0]

    def delta(self, base: Denoiser, place: LayerPlace, param: str) -> torch.Tensor:
        """`self − base` on one tensor in float32, with one float32 buffer (subtracting the
        stored halves promotes them exactly)."""
        import torch

        subtrahend = base.stored(place, param)
        if subtrahend.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # fp8 does not promote
            subtrahend = subtrahend.to(torch.float32)
        return self.load(place, param).sub_(subtrahend)


def open_denoiser(path: str, stack: ExitStack) -> tuple[Denoiser | None, Any]:
    """(the model's denoiser with fp8 scales applied, None if it holds none; its identity)."""
    model = stack.enter_context(open_model(path))
    identity = identify(model)
    found = find_denoiser(model)
    if found is None:
        return None, identity
    root, match = found
    return Denoiser(path, plain_values(model, identity, lazy_tensors(model)), root, match), identity


# ---- which layers --------------------------------------------------------------------------

def layer_places(base: Denoiser, tuned: Denoiser) -> list[LayerPlace]:
    """Every weight place of the family at either model's sizes (in the base's order)."""
    family = base.match.family
    places: dict[str, LayerPlace] = {}
    for model in (base, tuned):
        paths = [name[len(model.root): -len(".weight")] for name in model.tensors
                 if name.startswith(model.root) and name.endswith(".weight")]
        dims = dict(model.match.dims)
        for place in place_index(family, dims, dims, paths).places:
            places.setdefault(place.ldm, place)
    return list(places.values())


def in_block(family: Family, place: LayerPlace) -> bool:
    """Whether the layer sits in one of the family's repeated blocks."""
    patterns = [pattern for layout in family.layouts for pattern in layout.counts.values()]
    return any(re.match(pattern, path) for pattern in patterns for path in (place.ldm, *place.parts))


def first_difference(base: Denoiser, tuned: Denoiser, places: list[LayerPlace]) -> str | None:
    """The first tensor whose shape differs between the models, or that one lacks, said in
    words (None: they match)."""
    for place in places:
        for param in _PARAMS:
            mine, other = base.shape(place, param), tuned.shape(place, param)
            if mine == other:
                continue
            key = (base.names(place, param) if mine is not None else tuned.names(place, param))[0]
            if mine is None:
                return f"{key}: the base has no such tensor, the tuned model has {list(other)}"
            if other is None:
                return f"{key}: the tuned model has no such tensor (the base has {list(mine)})"
            return f"{key}: shape {list(other)} in the tuned model, {list(mine)} in the base"
    return None


def _require_same_model(base: Denoiser, tuned: Denoiser | None, tuned_path: str, places: list[LayerPlace]) -> None:
    family = base.match.family
    if tuned is None:
        raise SdkitError(f"{tuned_path}: holds no transformer denoiser; "
                         f"the base is {with_article(family.title)} model")
    problem = first_difference(base, tuned, places)
    if tuned.match.family is not family:
        detail = f" ({problem})" if problem else ""
        raise SdkitError(f"{tuned.path}: is {with_article(tuned.match.family.title)} model, the base is "
                         f"{family.title}{detail}")
    if problem:
        raise SdkitError(f"{tuned.path}: {family.title} of other sizes than the base: {problem}")


# ---- the operation -------------------------------------------------------------------------

def extract_transformer_lora(tuned: str | os.PathLike[str], base: str | os.PathLike[str], output: Path,
                             options: ExtractOptions, report: SvdReport, *, overwrite: bool = False,
                             progress: Progress | None = None) -> SvdReport:
    """Write the LoRA approximating `tuned − base` (two transformer denoisers) to `output`."""
    layout = options.to or ("diffusers" if options.format == "diffusers" else DEFAULT_LAYOUT)
    if layout not in LAYOUTS:
        raise SdkitError(f"--to must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if options.full_diff and layout == "diffusers":
        raise SdkitError("--full-diff: the diffusers (peft) layout has no full-weight modules; "
                         "use --to comfyui or kohya")
    rule = options.rule()
    with ExitStack() as stack:
        original, identity = open_denoiser(str(base), stack)
        finetuned, _ = open_denoiser(str(tuned), stack)
        places = layer_places(original, finetuned) if finetuned else []
        _require_same_model(original, finetuned, str(tuned), places)
        family = original.match.family
        adapted = [p for p in places if in_block(family, p) and len(original.shape(p, ".weight") or ()) == 2]
        dtype = _output_dtype(options, identity)
        held = HeldFactors(dtype, None)
        # a randomized SVD is checked against the full one on the smallest layer only: a
        # full SVD of FLUX's smallest (3072 x 3072) takes 10-30 s on one thread
        sizes = sorted(range(len(adapted)), key=lambda i: math.prod(original.shape(adapted[i], ".weight")))
        checked = set(sizes[:min(options.sample_layers, _CHECKED_LAYERS)])

        def extract(index: int) -> tuple[ExportModule, Factors, dict[str, Any] | None] | None:
            place = adapted[index]
            delta = finetuned.delta(original, place, ".weight")
            name = unet_name("kohya", place.ldm)
            module = ExportModule("unet", None, place.ldm, {}, name=name)
            extracted = factorised_layer(module, name, delta, rule, check=index in checked)
            return None if extracted is None else held.hold(*extracted)

        text = text_layers(original, finetuned, options.min_diff, report)

        def extract_any(index: int) -> tuple[ExportModule, Factors, dict[str, Any] | None] | None:
            if index < len(adapted):
                return extract(index)
            layer = text[index - len(adapted)]
            module = ExportModule(layer.component, layer.path, layer.path, {}, name=layer.name)
            extracted = factorised_layer(module, layer.name, layer.delta(), rule, check=False)
            return None if extracted is None else held.hold(*extracted)

        modules = extract_layers(extract_any, len(adapted) + len(text), report, lambda module: module.name,
                                 progress)
        differing = _whole_differences(original, finetuned, places, adapted, modules, dtype, options.full_diff)
        if differing:
            report.notes.append(f"{differing} other tensors differ (biases, embedders, norms, final layer): "
                                "--full-diff keeps them as full differences")
        if not modules:
            raise SdkitError(f"{output}: nothing to write: the models do not differ in any adapted layer")
        _write(output, modules, family, places, layout, (str(tuned), str(base)), options, overwrite)
    return report


# ---- text encoders ----------------------------------------------------------------------------

@dataclass
class TextLayer:
    """One adapted text-encoder layer of both models: its component, path and kohya name."""

    component: str
    path: str
    name: str
    key: str  # the weight's key in both models
    base: Denoiser
    tuned: Denoiser

    def delta(self) -> torch.Tensor:
        return _key_delta(self.tuned, self.base, self.key)


def _key_delta(tuned: Denoiser, base: Denoiser, key: str) -> torch.Tensor:
    """`tuned − base` of one tensor in float32 (fp8 values widened before subtracting)."""
    import torch

    subtrahend = base.tensors[key].load()
    if subtrahend.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        subtrahend = subtrahend.to(torch.float32)
    return tuned.tensors[key].load().to(torch.float32, copy=True).sub_(subtrahend)


def text_layers(base: Denoiser, tuned: Denoiser, min_diff: float, report: SvdReport) -> list[TextLayer]:
    """The adapted layers of the text encoders both checkpoints hold, those of an encoder
    that differs by more than `min_diff` somewhere."""
    family = base.match.family
    kinds = {spec.component: spec for spec in family.text_encoders if spec.architecture in TEXT_ARCHITECTURES}
    mine = {t.weight.key: t for t, _ in encoder_targets(base.tensors, family) if t.component in kinds}
    theirs = {t.weight.key: t for t, _ in encoder_targets(tuned.tensors, family) if t.component in kinds}
    if bool(mine) != bool(theirs):
        holder = "base" if mine else "tuned model"
        report.notes.append(f"text encoders left out: only the {holder} holds them")
        return []
    by_component: dict[str, list[TextLayer]] = {}
    for key, target in mine.items():
        other = theirs.get(key)
        if other is None or other.shape != target.shape:
            found = "no such tensor" if other is None else f"shape {list(other.shape)}"
            raise SdkitError(f"{tuned.path}: {key}: {found} in the tuned model, {list(target.shape)} in the base")
        if _TEXT_LAYER.search(target.path) and len(target.shape) == 2:
            name = text_name(family, "kohya", f"{target.component}.{target.path}")
            by_component.setdefault(target.component, []).append(
                TextLayer(target.component, target.path, name, key, base, tuned))
    kept = []
    for component, layers in by_component.items():
        largest = max(float(layer.delta().abs().max()) for layer in layers)
        if largest > min_diff:
            kept += layers
        else:
            report.notes.append(f"{kinds[component].part or component} left out: no weight differs by more than {min_diff} "
                                f"(largest {largest:.3g})")
    return kept


def _whole_differences(base: Denoiser, tuned: Denoiser, places: list[LayerPlace], adapted: list[LayerPlace],
                       modules: list[ExportModule], dtype: torch.dtype, keep: bool) -> int:
    """Count the tensors outside the LoRA factors that differ; with `keep`, add them to
    `modules` whole (`diff_b` on an adapted layer's module, `diff` / `diff_b` modules for
    the rest). Returns how many differ but were left out."""
    by_layer = {module.ldm_path: module for module in modules}
    lora_layers = {place.ldm for place in adapted}
    left_out = 0
    for place in places:
        whole = {}
        for param, key in ((".weight", "diff"), (".bias", "diff_b")):
            if (param == ".weight" and place.ldm in lora_layers) or base.shape(place, param) is None:
                continue
            delta = tuned.delta(base, place, param)
            if bool(delta.any()):
                whole[key] = delta.to(dtype)
        if not whole:
            continue
        if not keep:
            left_out += len(whole)
        elif place.ldm in by_layer:
            by_layer[place.ldm].tensors.update(whole)
        else:
            modules.append(ExportModule("unet", None, place.ldm, whole, None, unet_name("kohya", place.ldm)))
    return left_out


def _output_dtype(options: ExtractOptions, identity: Any) -> torch.dtype:
    import torch

    from sdkit.io.dtypes import CODE_TO_TORCH
    from sdkit.ops.lora.merge import DTYPES

    if options.dtype:
        return getattr(torch, DTYPES[options.dtype])
    dominant = identity.precision.dominant
    return CODE_TO_TORCH[dominant] if dominant in _PLAIN_DTYPES else torch.bfloat16  # fp8 / GGUF bases


# ---- writing ---------------------------------------------------------------------------------

def _write(output: Path, modules: list[ExportModule], family: Family, places: list[LayerPlace], layout: str,
           inputs: tuple[str, str], options: ExtractOptions, overwrite: bool) -> None:
    """The modules (kohya-named, single-file paths) in `layout`'s names, with sd-scripts'
    `ss_*` keys (single-file layouts) or the peft config (diffusers) and the recipe."""
    kohya = {f"{module.name}.{role}": tensor for module in modules for role, tensor in module.tensors.items()}
    kohya.update({f"{module.name}.alpha": _scalar(module.alpha) for module in modules if module.alpha is not None})
    lora = parse_lora(kohya)
    tensors, ranks = layout_tensors(lora, PlaceIndex(family, places), layout)
    facts = LoraFacts(family.name, family.prediction, family.kohya_network_module)
    if layout == "diffusers":
        extra = {"lora_adapter_metadata": adapter_metadata(ranks)}
    else:
        extra = network_metadata([m for m in modules if "lora_down.weight" in m.tensors], facts)
        if options.full_diff:
            extra["ss_network_args"] = '{"full_diff": "true"}'
    spec = SpecFacts(family=family.name, prediction=family.prediction, adapter="lora",
                     implementation=DIFFUSERS_IMPLEMENTATION if layout == "diffusers" else None)
    metadata = build_metadata("lora-extract", list(inputs), {**params_of(options), "to": layout}, spec, extra,
                              title=output.stem)
    if layout != "diffusers":
        metadata.update(addnet_hashes(tensors, metadata))
    write_safetensors(output, tensors, metadata, overwrite=overwrite)


def _scalar(value: float) -> torch.Tensor:
    import torch

    return torch.tensor(float(value), dtype=torch.float32)
