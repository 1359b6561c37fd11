"""Bake LoRA-family adapters into a base model: `W' = W + Σ strength · ΔW`.

The output is a set of lazy tensors over the base. Keys no adapter touches are copied as
they are (cast only with `dtype`); a touched key gets each adapter's delta in float32
(into its rows, for a q/k/v third of an OpenCLIP `in_proj_weight`) and is cast once to
the base's dtype (or `dtype`), see `compute.py`. Deltas are computed against the
original base weight, so the order of the adapters does not matter, also for the types
whose delta depends on the weight (IA3, GLoRA, OFT, DoRA). Bias deltas go to the layer's
bias where the base has one and are reported where it has none. Touched keys are
computed on worker threads ahead of the streaming writer.

The output keeps the base's convention (single file or diffusers folder) unless `to`
asks for the other one; metadata records the recipe (inputs with sha256, strengths,
options) and ModelSpec. A transformer denoiser (FLUX, SD3, …; alone, under
`model.diffusion_model.` in a checkpoint, or a lone diffusers folder) keeps its own names,
and its other parts are copied; a fused single-file module may land on several diffusers
tensors and a diffusers part on rows of a fused tensor (`lora_names.Target.pieces`).
A transformer in fp8 (plain, ComfyUI scaled or mixed) or GGUF is baked in float32 and
its touched weights stored back in their own format, the output in the base's container
(`quantized.py`).

    from sdkit.ops.lora.bake import AdapterInput, BakeOptions, bake_loras
    bake_loras("base.safetensors", [AdapterInput("style.safetensors", 0.8)], "out.safetensors")
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from sdkit.errors import SdkitError
from sdkit.io import LazyTensor, write_safetensors
from sdkit.io.ahead import DEFAULT_WORKERS, single_threaded_torch
from sdkit.io.model_file import FLOAT_DTYPES
from sdkit.io.output_path import build_in_partial, check_output_path
from sdkit.ops.lora.compute import KeyBaker
from sdkit.ops.lora.quantized import (QuantizedBase, RequantReport, gguf_string_fields, quantization_scheme,
                                      quantized_base, requantized_tensors, scale_owners, write_baked_gguf)
from sdkit.ops.lora.plan import (COMPONENT_CHOICES, AdapterInput, AdapterReport, BakePlan, OpenBase, open_base,
                                 plan_bake)
from sdkit.ops.folders import write_component_folder, write_pipeline_folder
from sdkit.ops.layout import CONVENTIONS, ModelView, component_prefix, convert_view
from sdkit.ops.precision import cast_tensors
from sdkit.ops.recipe_meta import DIFFUSERS_IMPLEMENTATION, InputDigests, SpecFacts, build_metadata

if TYPE_CHECKING:
    import torch

__all__ = ["AdapterInput", "BakeOptions", "BakeResult", "bake_loras"]

Progress = Callable[[int], None]
DTYPE_CODES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
_SAFETENSORS = (".safetensors", ".sft")
_GGUF = ".gguf"


@dataclass(frozen=True)
class BakeOptions:
    """How to bake: output dtype, which components, per-block factors, the scale of
    alpha-less adapters, the family check, the output convention."""

    dtype: str | None = None  # "fp16" | "bf16" | "fp32"; None keeps each key's dtype
    components: str = "all"  # "all" | "unet" | "te"
    blocks: str | None = None  # "BASE:0,IN04:0.5,…" or one value per block
    rank: int | None = None  # the divisor of alpha for adapters trained with a known rank
    alpha: float | None = None  # alpha for adapters that store none
    allow_family_mismatch: bool = False  # bake adapters made for another family
    to: str | None = None  # "ldm" | "diffusers"; None keeps the base's convention

    def check(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPE_CODES:
            raise SdkitError(f"dtype must be one of {', '.join(DTYPE_CODES)}, not {self.dtype!r}")
        if self.components not in COMPONENT_CHOICES:
            raise SdkitError(f"components must be one of {', '.join(COMPONENT_CHOICES)}")
        if self.to is not None and self.to not in CONVENTIONS:
            raise SdkitError(f"--to must be one of {', '.join(CONVENTIONS)}, not {self.to!r}")


@dataclass
class BakeResult:
    output: str
    convention: str
    adapters: list[AdapterReport]
    tensors: int = 0
    touched: int = 0
    notes: list[str] = field(default_factory=list)
    requantized: RequantReport | None = None  # a quantized base's touched weights stored back

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "convention": self.convention, "tensors": self.tensors,
                "touched": self.touched, "adapters": [a.to_json() for a in self.adapters],
                "notes": self.notes,
                "requantized": self.requantized.to_json() if self.requantized is not None else None}


def bake_loras(base: str | os.PathLike[str], adapters: Sequence[AdapterInput],
               output: str | os.PathLike[str], options: BakeOptions = BakeOptions(), *,
               overwrite: bool = False, progress: Progress | None = None) -> BakeResult:
    """Bake `adapters` into `base` and write the result to `output`."""
    options.check()
    output = Path(output)
    check_output_path(output, (base, *(item.path for item in adapters)), force=overwrite)
    with ExitStack() as stack:
        digests = stack.enter_context(InputDigests([base, *(item.path for item in adapters)]))
        opened = open_base(str(base), stack)
        quantized = quantized_base(opened, options.dtype)
        _check_output_format(opened, output)
        plan = plan_bake(opened, adapters, stack, components=options.components, blocks=options.blocks,
                         rank=options.rank, alpha=options.alpha,
                         allow_family_mismatch=options.allow_family_mismatch)
        own = opened.denoiser.layout.convention if opened.denoiser else opened.view.convention
        result = BakeResult(str(output), options.to or own, plan.reports,
                            notes=list(opened.names.notes))
        baker = key_baker(plan, options.dtype, quantized)
        # touched keys are computed on the writer's worker threads, ahead of it, while it
        # copies the untouched ones; one torch thread each, as for merges
        if quantized is not None:
            result.requantized = RequantReport(quantized.scheme)
            stack.enter_context(single_threaded_torch())
            _write_quantized(opened, quantized, baker, output, options, adapters, result, overwrite, progress,
                             digests)
        else:
            tensors = baked_tensors(plan, baker, baker.compute, options.dtype, result)
            stack.enter_context(single_threaded_torch())
            _write(opened, tensors, output, options, adapters, result, overwrite, progress, digests, baker)
    if baker.clamped:
        result.notes.append(f"{len(baker.clamped)} baked tensors clamped to the output dtype's range "
                            f"(e.g. {baker.clamped[0]})")
    return result


# ---- the baked tensors -------------------------------------------------------------------

def key_baker(plan: BakePlan, dtype: str | None, quantized: QuantizedBase | None = None) -> KeyBaker:
    """The baker of the touched keys: each made in its output dtype, or in float32 where a
    quantized base's weight is stored back in its format afterwards."""
    target = DTYPE_CODES[dtype] if dtype else None
    codes = {}
    for name, lazy in plan.base.view.tensors.items():
        if quantized is not None and quantized.requantized(name) and (name in plan.weights or name in plan.biases):
            codes[name] = "F32"
        elif name in plan.weights or name in plan.biases:
            codes[name] = target if target and lazy.dtype in FLOAT_DTYPES else lazy.dtype
    sources = quantized.sources if quantized is not None else plan.base.view.tensors
    return KeyBaker(sources, plan.weights, plan.biases, codes)


def baked_tensors(plan: BakePlan, baker: KeyBaker, load: Callable[[str], "torch.Tensor"], dtype: str | None,
                  result: BakeResult) -> dict[str, LazyTensor]:
    """The base's tensors (view names), touched keys produced by `load(name)`."""
    sources = plan.base.view.tensors
    touched = {name: LazyTensor(code, sources[name].shape, partial(load, name))
               for name, code in baker.codes.items()}
    untouched = {name: lazy for name, lazy in sources.items() if name not in touched}
    result.touched = len(touched)
    if dtype:
        untouched, report = cast_tensors(untouched, DTYPE_CODES[dtype], policy="clamp")
        result.notes.append(f"{len(report.cast)} untouched tensors cast to {dtype}")
    return {name: touched.get(name) or untouched[name] for name in sources}


# ---- writing -----------------------------------------------------------------------------

def _write(opened: OpenBase, tensors: dict[str, LazyTensor], output: Path, options: BakeOptions,
           adapters: Sequence[AdapterInput], result: BakeResult, overwrite: bool,
           progress: Progress | None, digests: InputDigests, baker: KeyBaker) -> None:
    view = opened.view
    if opened.denoiser is not None:
        _check_transformer_convention(opened, options)
        convention = opened.denoiser.layout.convention
    else:
        convention = options.to or view.convention
    metadata = _metadata(opened, adapters, options, output, convention, digests)
    if opened.denoiser is not None and not view.standalone:  # a lone file or a checkpoint: names kept
        _require_file(output)
        write_safetensors(output, tensors, metadata, overwrite=overwrite, progress=progress, finish=digests.patch,
                          workers=DEFAULT_WORKERS,
                          cost=lambda name: baker.cost(name) if name in baker.codes else tensors[name].nbytes)
        result.tensors = len(tensors)
        return
    if view.standalone:
        if convention != view.convention:
            raise SdkitError(f"{opened.model.path}: a lone component keeps its convention here; "
                             "convert the baked file with `sdkit convert`")
        _write_standalone(opened, tensors, output, metadata, overwrite, progress, digests.patch)
        result.tensors = len(tensors)
        return
    baked = ModelView(view.convention, view.layout, tensors, view.components, view.configs)
    converted = convert_view(baked, convention)
    result.tensors = len(converted.tensors)
    if convention == "ldm":
        _require_file(output)
        written = converted.tensors
        write_safetensors(output, written, metadata, overwrite=overwrite, progress=progress, finish=digests.patch,
                          workers=DEFAULT_WORKERS,
                          cost=lambda name: baker.cost(name) if name in baker.codes else written[name].nbytes)
        return
    if output.suffix.lower() in _SAFETENSORS:
        raise SdkitError(f"{output}: a diffusers pipeline is a folder; give a folder path")
    config_dir = Path(opened.model.path) if opened.model.components else None
    folder = write_pipeline_folder(output, converted.tensors, converted.configs, converted.layout,
                                   prediction=opened.identity.prediction,
                                   zero_snr="zero_terminal_snr" in opened.identity.facts,
                                   metadata_for=lambda _: metadata,
                                   config_dir=config_dir, overwrite=overwrite, progress=progress,
                                   finish=digests.patch)
    result.notes += folder.notes


def _write_quantized(opened: OpenBase, quantized: QuantizedBase, baker: KeyBaker, output: Path,
                     options: BakeOptions, adapters: Sequence[AdapterInput], result: BakeResult, overwrite: bool,
                     progress: Progress | None, digests: InputDigests) -> None:
    """A quantized transformer base, baked and written back in its own format and container."""
    _check_transformer_convention(opened, options)
    report = result.requantized
    assert report is not None
    result.touched = len(baker.codes)
    if quantized.layout is not None:
        metadata = _metadata(opened, adapters, options, output, opened.denoiser.layout.convention, digests,
                             carried=gguf_string_fields(quantized))
        result.tensors = write_baked_gguf(quantized, baker, output, metadata, digests, report,
                                          overwrite=overwrite, progress=progress)
    else:
        _require_file(output)
        metadata = _metadata(opened, adapters, options, output, opened.denoiser.layout.convention, digests)
        tensors = requantized_tensors(quantized, opened.view.tensors, baker, report)
        owners = scale_owners(quantized)

        def cost(name: str) -> int:
            owner = owners.get(name, name)
            return baker.cost(owner) if owner in baker.codes else tensors[name].nbytes
        # a touched weight's fresh scale is known once the weight is made: laid out after
        # the weights, each weight is baked once (before them, twice: once for its scale)
        fresh_scales = [scale for scale, owner in owners.items() if owner in baker.codes]
        # one worker: a requantized weight holds its float32 bake, the fp8 weight read and
        # the values made, and the writer's wait for one weight is not counted in the
        # budget, so two workers held two FLUX-sized layers at once (1.3 GiB against 0.9
        # GiB at a FLUX 2+4-block base) for no measured gain in time
        write_safetensors(output, tensors, metadata, overwrite=overwrite, progress=progress, finish=digests.patch,
                          workers=1, cost=cost, last=fresh_scales)
        result.tensors = len(tensors)
    if report.requantized:
        result.notes.append(f"{len(report.requantized)} changed weights stored back in {opened.identity.precision.label}; "
                            "requantization error, worst layer classes first:")
        result.notes += report.summary()


def _check_output_format(opened: OpenBase, output: Path) -> None:
    """A GGUF base gives a .gguf file, any other base no .gguf: the output keeps the
    base's container."""
    gguf_base = quantization_scheme(opened) == "gguf"
    if gguf_base and output.suffix.lower() != _GGUF:
        raise SdkitError(f"{output}: a bake into a GGUF base writes GGUF; give a .gguf output path")
    if not gguf_base and output.suffix.lower() == _GGUF:
        raise SdkitError(f"{output}: the bake keeps the base's format ({opened.model.path} is not GGUF); "
                         "convert the baked file with `sdkit convert --to gguf`")


def _check_transformer_convention(opened: OpenBase, options: BakeOptions) -> None:
    own = opened.denoiser.layout.convention
    if options.to is not None and options.to != own:
        raise SdkitError(f"{opened.model.path}: a transformer keeps its key convention in a bake; "
                         "convert the baked file with `sdkit convert`")


def _require_file(output: Path) -> None:
    if output.suffix.lower() not in _SAFETENSORS:
        raise SdkitError(f"{output}: the output must be a .safetensors file")


def _write_standalone(opened: OpenBase, tensors: dict[str, LazyTensor], output: Path,
                      metadata: dict[str, str], overwrite: bool, progress: Progress | None,
                      finish: Callable[[Path], None]) -> None:
    """A lone component back under its own names (the view added a component prefix)."""
    view = opened.view
    component = view.components[0]
    prefix = component_prefix(view, component)
    own = {name[len(prefix):]: lazy for name, lazy in tensors.items()}
    if opened.model.components:  # a component folder in, a component folder out
        config = view.configs.get(component, {})
        build_in_partial(output, overwrite, lambda folder: write_component_folder(
            folder, component, own, config, metadata, progress, finish))
        return
    _require_file(output)
    write_safetensors(output, own, metadata, overwrite=overwrite, progress=progress, finish=finish)


def _metadata(opened: OpenBase, adapters: Sequence[AdapterInput], options: BakeOptions, output: Path,
              convention: str, digests: InputDigests, carried: dict[str, str] | None = None) -> dict[str, str]:
    """The output's metadata; `carried` (default: the base's metadata) is what it keeps."""
    params = {"strengths": [item.strength for item in adapters],
              **{k: v for k, v in asdict(options).items() if v not in (None, False, "all")}}
    implementation = DIFFUSERS_IMPLEMENTATION if convention == "diffusers" else None
    facts = SpecFacts.from_identity(opened.identity, implementation=implementation)
    if carried is None:
        carried = {} if opened.model.components else opened.model.metadata
    carried = {k: v for k, v in carried.items() if k != "modelspec.title"}
    return build_metadata("lora-bake", digests.paths, params, facts, title=output.stem, carried=carried,
                          hashes=digests.placeholders)
