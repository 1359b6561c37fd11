"""`convert_model`: one file or folder in, one out — format, layout, precision, pruning, repair.

The input is opened lazily and seen as a checkpoint-shaped view (`sdkit.ops.layout`); then,
all on lazy tensors, in this order:
1. `--ema` puts the EMA weights in the UNet's place; `--prune` drops what is not model
   weights; `--fix-clip` rewrites broken CLIP position ids (without it they are noted);
2. the layout changes if asked (single-file ⇄ diffusers) and `--only` keeps one component;
   a config.json derived from LDM weights takes what no weight says (attention heads, norm
   groups, sample size, …) from the released model of the same sizes; a model of other
   sizes needs `--config` and is refused without it (`sdkit.arch.keymaps.stock`);
3. float tensors are cast (`--dtype`, `--keep-fp32`, overflow policy); CLIP position ids
   never are (they index a table; `--fix-clip` rewrites broken ones as int64);
4. the streaming writer pulls one tensor at a time into a safetensors file, a component
   folder or a diffusers pipeline folder — always atomically. A conversion that would
   only copy its safetensors input although something was asked of it is refused.
Pickle inputs are read by the restricted unpickler; tensors that share storage come out
as separate copies of their own bytes (safetensors cannot alias) and are reported.
LoRA and embedding files go to `lora.py` / `embedding.py` here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from sdkit.arch import Identity, identify
from sdkit.arch.families import FAMILIES
from sdkit.arch.hygiene import broken_position_ids
from sdkit.arch.keymaps import LAYOUTS, ldm_layout
from sdkit.arch.keymaps.stock import complete_configs
from sdkit.arch.prediction import ZTSNR_MARKER
from sdkit.arch.quantization import METADATA_KEY
from sdkit.errors import SdkitError, with_article
from sdkit.io import LazyTensor, ModelFile, lazy_tensors, open_model
from sdkit.io.dtypes import NAME_TO_CODE
from sdkit.io.output_path import check_output_path
from sdkit.ops.folders import (build_in_partial, read_config_dir, stored_tensors, write_component_folder,
                               write_on_workers, write_pipeline_folder)
from sdkit.ops.layout import (COMPONENTS, Converted, ModelView, component_prefix, convert_view,
                              is_ldm_checkpoint, model_view)
from sdkit.ops.fp8 import FP8_DTYPES, SCALINGS, Fp8Report, cast_fp8, family_keep
from sdkit.ops.precision import (OVERFLOW_POLICIES, OverflowStop, PrecisionReport, cast_tensors, key_matcher,
                                 overflow_error, scan_overflow)
from sdkit.ops.convert.prune import PruneReport, prune_tensors, swap_in_ema
from sdkit.ops.convert.repair import fix_position_ids
from sdkit.ops.recipe_meta import (DIFFUSERS_IMPLEMENTATION, BackgroundHash, SpecFacts, build_metadata,
                                   recorded_path)

if TYPE_CHECKING:
    import torch

Progress = Callable[[int], None]
TARGETS = ("safetensors", "single-file", "diffusers", "gguf")
DTYPES = ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")
_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
_POSITION_IDS = "position_ids"
_DENOISER_ROOT = "model.diffusion_model."
_VAE_ROOTS = ("first_stage_model.", "vae.", "vae/")
_SHOWN = 3


@dataclass
class ConvertOptions:
    """What `sdkit convert` was asked to do (see the CLI help for each)."""

    to: str = "safetensors"  # keep the layout | "single-file" (LDM) | "diffusers" | "gguf"
    quant: str | None = None  # with to="gguf": a type of sdkit.ops.convert.gguf.QUANT_TYPES
    dtype: str | None = None  # "fp32" | "fp16" | "bf16" | "fp8_e4m3fn" | "fp8_e5m2"
    fp8_scaling: str = "scaled"  # "plain" | "scaled" | "mixed" (sdkit.ops.fp8)
    keep_fp32: tuple[str, ...] = ()
    overflow: str = "refuse"  # "refuse" | "clamp" | "allow-inf"
    prune: bool = False
    ema: bool = False
    only: str | None = None  # one of COMPONENTS
    fix_clip: bool = False
    config_dir: str | None = None  # a local diffusers folder to take configs / tokenizers from
    force: bool = False

    def check(self) -> None:
        if self.to not in TARGETS:
            raise SdkitError(f"--to must be one of {', '.join(TARGETS)}, not {self.to!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise SdkitError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.overflow not in OVERFLOW_POLICIES:
            raise SdkitError(f"overflow policy must be one of {', '.join(OVERFLOW_POLICIES)}")
        self._check_gguf()
        if self.keep_fp32 and self.dtype is None and self.quant is None:
            raise SdkitError("--keep-fp32 only means something with --dtype or --quant")
        if self.fp8_scaling not in SCALINGS:
            raise SdkitError(f"--fp8-scaling must be one of {', '.join(SCALINGS)}, not {self.fp8_scaling!r}")
        if self.only is not None and self.only not in COMPONENTS:
            raise SdkitError(f"--only must be one of {', '.join(COMPONENTS)}, not {self.only!r}")

    def _check_gguf(self) -> None:
        from sdkit.ops.convert.gguf import QUANT_TYPES

        if self.to != "gguf":
            if self.quant is not None:
                raise SdkitError("--quant is for --to gguf")
            return
        if self.quant is None:
            raise SdkitError(f"--to gguf needs --quant, one of {', '.join(QUANT_TYPES)}")
        if self.quant.upper() not in QUANT_TYPES:
            raise SdkitError(f"--quant must be one of {', '.join(QUANT_TYPES)}, not {self.quant!r}")
        self.quant = self.quant.upper()
        if self.dtype is not None or self.only not in (None, "unet") or self.prune or self.ema or self.fix_clip:
            raise SdkitError("--to gguf writes the diffusion model at --quant; --dtype, --only, --prune, --ema "
                             "and --fix-clip do not apply")

    def to_json(self) -> dict[str, Any]:
        fp8 = {"fp8_scaling": self.fp8_scaling} if self.dtype in FP8_DTYPES else {}
        quant = {"quant": self.quant} if self.quant else {}
        return {"to": self.to, **quant, "dtype": self.dtype, **fp8, "keep_fp32": list(self.keep_fp32),
                "overflow": self.overflow, "prune": self.prune, "ema": self.ema, "only": self.only,
                "fix_clip": self.fix_clip,
                "config": recorded_path(self.config_dir) if self.config_dir else None}


@dataclass
class ConvertResult:
    """What a conversion wrote and everything it changed or noticed on the way."""

    output: Path
    written: str  # "file" | "folder"
    kind: str  # what the input is (identify's kind)
    family: str
    convention: str  # key convention of the output
    tensors: int = 0
    bytes: int = 0
    precision: PrecisionReport | None = None
    fp8: Fp8Report | None = None
    gguf: Any = None  # sdkit.ops.convert.gguf.GgufReport
    prune: PruneReport = field(default_factory=PruneReport)
    fixed_position_ids: dict[str, str] = field(default_factory=dict)
    broken_position_ids: dict[str, str] = field(default_factory=dict)
    shared: list[list[str]] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # no place in the output layout
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what a user must know even with --quiet

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output), "written": self.written, "kind": self.kind, "family": self.family,
            "convention": self.convention, "tensors": self.tensors, "bytes": self.bytes,
            "precision": self.precision.to_json() if self.precision else None,
            "fp8": self.fp8.to_json() if self.fp8 else None,
            **({"gguf": self.gguf.to_json()} if self.gguf else {}),
            "prune": self.prune.to_json(), "fixed_position_ids": self.fixed_position_ids,
            "broken_position_ids": self.broken_position_ids, "shared_tensors": self.shared,
            "left_out": len(self.left_out), "notes": self.notes, "warnings": self.warnings,
        }


def convert_model(source: str | os.PathLike[str], output: str | os.PathLike[str],
                  options: ConvertOptions | None = None, progress: Progress | None = None) -> ConvertResult:
    """Convert `source` into `output` as `options` say; SdkitError for refused input."""
    options = options or ConvertOptions()
    options.check()
    source, output = Path(source), Path(output)
    check_output_path(output, (source, options.config_dir), force=options.force)
    with open_model(source) as model:
        # the input's sha256 goes into the output's recipe: it is computed beside
        # everything else from here on (identifying, importing torch, writing)
        input_hash = BackgroundHash(model.path)
        try:
            identity = identify(model)
        except BaseException:
            input_hash.cancel()
            raise
        if options.to == "gguf":
            from sdkit.ops.convert.gguf import convert_to_gguf
            return _cancelled_on_error(input_hash, lambda: convert_to_gguf(model, identity, output, options,
                                                                           progress, input_hash))
        if identity.kind in ("lora", "hypernetwork", "embedding"):  # converted without a recipe hash
            input_hash.cancel()
        if identity.kind == "lora":
            from sdkit.ops.convert.lora import convert_lora_file
            return convert_lora_file(model, identity, output, options, progress)
        if identity.kind == "hypernetwork":
            raise SdkitError(f"{source}: hypernetworks load only as A1111 .pt files; nothing to convert")
        if identity.kind == "embedding":
            from sdkit.ops.convert.embedding import convert_embedding_file
            return convert_embedding_file(model, identity, output, options, progress)
        if options.to in ("single-file", "diffusers") and is_all_in_one(identity):
            from sdkit.ops.convert.all_in_one import AllInOneConversion
            return AllInOneConversion(model, identity, output, options, progress, input_hash).run()
        if options.to != "safetensors" and identity.components == ["transformer"]:
            from sdkit.ops.convert.transformer import TransformerConversion
            return TransformerConversion(model, identity, output, options, progress, input_hash).run()
        return ModelConversion(model, identity, output, options, progress, input_hash).run()


def _cancelled_on_error(input_hash: BackgroundHash, convert: Callable[[], ConvertResult]) -> ConvertResult:
    try:
        return convert()
    except BaseException:
        input_hash.cancel()
        raise


def is_all_in_one(identity: Identity) -> bool:
    """A transformer family's diffusion model with other parts in one file or folder."""
    return "transformer" in identity.components and len(identity.components) > 1


def model_prefixes(model: ModelFile, identity: Identity) -> tuple[str, ...] | None:
    """Component prefixes of an LDM checkpoint of a known layout (None for anything else)."""
    if identity.kind != "checkpoint" or not is_ldm_checkpoint(model):
        return None
    return tuple(part.prefix for part in LAYOUTS[ldm_layout(model.infos)])


class ModelConversion:
    """One checkpoint / component / pipeline conversion, step by step."""

    def __init__(self, model: ModelFile, identity: Identity, output: Path, options: ConvertOptions,
                 progress: Progress | None, input_hash: BackgroundHash) -> None:
        self.model, self.identity, self.output, self.options = model, identity, output, options
        self.progress = progress
        self.configs = read_config_dir(options.config_dir)
        self.convention = "ldm"
        self.result = ConvertResult(output, "file", identity.kind, identity.family, "ldm")
        self.result.shared = list(model.extra.get("__shared__") or [])
        self.input_hash = input_hash  # runs while the output is planned and written
        self.resolution: int | None = None  # pixels per side the model draws at, where a config says it
        self.fp8_metadata: dict[str, str] = {}  # what a mixed fp8 cast adds to the header

    def run(self) -> ConvertResult:
        try:
            return self._run()
        except BaseException:
            self.input_hash.cancel()
            raise

    def _run(self) -> ConvertResult:
        tensors = self._hygiene(lazy_tensors(self.model))
        view = model_view(self.model, self.identity, self._standalone_component())
        view.tensors = self._renamed(view, tensors)
        others = [name for name in self.model.components if name not in view.components and not view.standalone]
        if others:
            self.result.notes.append(f"components other than UNet, VAE and text encoders are not converted: "
                                     f"{', '.join(others)}")
        if self.options.only and self.options.only not in view.components:
            raise SdkitError(f"{self.model.path}: has no {self.options.only} "
                             f"(it holds {', '.join(view.components) or 'no model component'})")
        self.convention = self._target_convention(view)
        # the model's own configs or --config's say its size; a released model's is the family's
        self.resolution = _drawn_size({**view.configs, **self.configs})
        converted = convert_view(view, self.convention, self.configs)
        self._complete_configs(view, converted)
        self.result.left_out = converted.dropped
        outputs, sources = self._select(view, converted)
        self.result.convention = self.convention
        self._note_left_out()
        self._write(view, converted, outputs, sources)
        return self.result

    # -- 1. hygiene ------------------------------------------------------------------

    def _plain_values(self, tensors: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
        """Scaled fp8 weights as their values when a cast is asked (the scales would be
        lost in it); as they are otherwise."""
        scheme = (self.identity.precision.quantization or {}).get("scheme")
        if self.options.dtype is None or scheme not in ("scaled-fp8", "mixed"):
            return tensors
        from sdkit.arch.quantization import mixed_layer_formats
        from sdkit.ops.convert.dequantize import dequantize_mixed, dequantize_scaled_fp8

        if scheme == "mixed":
            plain, count = dequantize_mixed(tensors, mixed_layer_formats(self.model), str(self.model.path))
            self.result.notes.append(f"{count} mixed-precision layers multiplied by their scales before the "
                                     "cast; scales, comfy_quant tensors and the quantization metadata left out")
            return plain
        plain, scaled = dequantize_scaled_fp8(tensors)
        self.result.notes.append(f"{scaled} scaled fp8 weights multiplied by their scales before the cast; "
                                 "scale tensors and the scaled_fp8 marker left out")
        return plain

    def _hygiene(self, tensors: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
        tensors = self._plain_values(tensors)
        where = str(self.model.path)
        if self.options.ema:
            tensors = swap_in_ema(tensors, self.result.prune, where)
        if self.options.prune:
            tensors = prune_tensors(tensors, model_prefixes(self.model, self.identity), self.result.prune)
        broken = {name: problem for name, problem in broken_position_ids(self.model).items() if name in tensors}
        if broken and self.options.fix_clip:
            self.result.fixed_position_ids = broken
            return fix_position_ids(tensors, broken)
        if broken:
            self.result.broken_position_ids = broken
            self.result.notes.append(f"{len(broken)} broken CLIP position_ids kept as they are "
                                     "(--fix-clip rewrites them as 0..n-1 int64)")
        return tensors

    def _standalone_component(self) -> str | None:
        """What a lone component file or folder holds, when --only says so."""
        pipeline = self.model.components and self.model.extra.get("model_index") is not None
        return None if pipeline or is_ldm_checkpoint(self.model) else self.options.only

    def _renamed(self, view: ModelView, tensors: Mapping[str, LazyTensor]) -> dict[str, LazyTensor]:
        """`tensors` (named as in the file) in the view's namespace."""
        if not view.standalone:
            return {name: lazy for name, lazy in tensors.items() if name in view.tensors}
        prefix = component_prefix(view, view.components[0])
        if self.model.components:  # a lone component folder: `<folder name>/<key>`
            return {prefix + name.split("/", 1)[1]: lazy for name, lazy in tensors.items()}
        return {prefix + name: lazy for name, lazy in tensors.items()}

    # -- 2. layout -------------------------------------------------------------------

    def _target_convention(self, view: ModelView) -> str:
        if self.options.to == "safetensors":
            return view.convention
        if view.plain:
            raise SdkitError(f"{self.model.path}: {with_article(self.identity.kind)} file holds no UNet, VAE or text "
                             "encoder to convert between single-file and diffusers layouts")
        if "transformer" in self.identity.components:
            raise SdkitError(f"{self.model.path}: is {with_article(self.identity.part)}; sdkit converts the key "
                             f"layout (--to {self.options.to}) of a transformer diffusion model on its own, not yet "
                             "of one sharing a file or folder with other parts (--dtype converts its precision)")
        return "ldm" if self.options.to == "single-file" else "diffusers"

    def _written_component(self, view: ModelView) -> str | None:
        """The one component written (--only, or a lone component's file); None: all of them."""
        return self.options.only or (view.components[0] if view.standalone else None)

    def _writes_as_file(self) -> bool:
        return self.output.suffix.lower() in _SAFETENSORS_SUFFIXES

    def _complete_configs(self, view: ModelView, converted: Converted) -> None:
        """Configs derived from LDM weights that go into the output's config.json files get
        what the weights do not say from the released model of their sizes, or are refused."""
        if self.convention != "diffusers" or view.convention == "diffusers" or self._writes_as_file():
            return  # no config is derived, or none is written
        component = self._written_component(view)
        written = [component] if component else view.components
        derived = {name: converted.configs[name] for name in written
                   if name in converted.configs and name not in self.configs}
        try:
            completed = complete_configs(view.layout, derived)
        except SdkitError as exc:
            raise SdkitError(f"{self.model.path}: {exc}") from None
        converted.configs.update(completed)

    def _select(self, view: ModelView, converted: Converted) -> tuple[dict[str, LazyTensor], dict[str, list[str]]]:
        """Output tensors by final name, and the names each is made from (for --keep-fp32)."""
        component = self._written_component(view)
        if component is None:
            return converted.tensors, {n: [n, *converted.sources[n]] for n in converted.tensors}
        prefix = component_prefix(view, component, self.convention)
        outputs, sources = {}, {}
        for name, lazy in converted.tensors.items():
            if name.startswith(prefix):
                final = name[len(prefix):]
                outputs[final] = lazy
                sources[final] = [final, name, *converted.sources[name]]
        if not outputs:
            raise SdkitError(f"{self.model.path}: no {component} tensors")
        return outputs, sources

    def _note_left_out(self) -> None:
        # position ids are made again on the way back to a single file: not worth a note
        left = [key for key in self.result.left_out if not key.endswith("position_ids")]
        if left:
            shown = ", ".join(left[:_SHOWN]) + (", …" if len(left) > _SHOWN else "")
            self.result.notes.append(f"{len(left)} tensors have no place in the {self.convention} layout and "
                                     f"were left out ({shown})")

    # -- 3. precision and 4. writing --------------------------------------------------

    def _cast(self, outputs: dict[str, LazyTensor], sources: dict[str, list[str]]) -> dict[str, LazyTensor]:
        if self.options.dtype is None:
            return outputs
        if self.options.dtype in FP8_DTYPES:
            return self._cast_fp8(outputs, sources)
        code = NAME_TO_CODE[self.options.dtype]
        # position ids index the position embeddings: a float copy left by a merge stays as
        # it is (reported as kept), never rounded into another float type
        castable = {name: lazy for name, lazy in outputs.items() if not name.endswith(_POSITION_IDS)}
        cast, report = cast_tensors(castable, code, keep=self.options.keep_fp32, sources=sources,
                                    policy=self.options.overflow)
        self.result.precision = report
        return {name: cast.get(name, lazy) for name, lazy in outputs.items()}

    def _cast_fp8(self, outputs: dict[str, LazyTensor], sources: dict[str, list[str]]) -> dict[str, LazyTensor]:
        """Matrices to fp8 as --fp8-scaling says; VAE tensors and what the family or
        --keep names stay as they are."""
        if self.identity.kind == "vae":
            raise SdkitError(f"{self.model.path}: is a VAE; fp8 is for diffusion models and text encoders "
                             "(VAEs stay in 16 or 32 bits)")
        user = key_matcher(self.options.keep_fp32)
        family = self._family_fp8_keep()
        vae = {name for name in outputs if name.startswith(_VAE_ROOTS)}

        def keep(name: str) -> bool:
            names = [name, *sources.get(name, ())]
            return name in vae or any(family(candidate) or user(candidate) for candidate in names)
        root = _DENOISER_ROOT if any(name.startswith(_DENOISER_ROOT) for name in outputs) else ""
        cast, report, self.fp8_metadata = cast_fp8(outputs, self.options.dtype, self.options.fp8_scaling, keep,
                                                   marker_prefix=root)
        report.kept = [name for name in report.kept if name not in vae]
        self.result.fp8 = report
        return cast

    def _family_fp8_keep(self) -> Callable[[str], bool]:
        """The family's kept modules, for keys below the denoiser root in single-file names."""
        family = FAMILIES.get(self.identity.family)
        patterns = family.fp8_keep if family else ()
        roots = [family_keep(patterns, root) for root in (_DENOISER_ROOT, "unet/", "transformer/", "")]
        single_file = self._single_file_names()
        return lambda name: any(kept(name) or kept(single_file.get(name, name)) for kept in roots)

    def _single_file_names(self) -> dict[str, str]:
        """A diffusers-named transformer's keys in single-file names (the family's keep
        patterns are written in those); empty for anything else."""
        if self.identity.components != ["transformer"] or self.identity.key_convention != "diffusers":
            return {}
        from sdkit.ops.convert.transformer import single_file_names

        return single_file_names(self.model)

    def _copies_input(self, final: Mapping[str, LazyTensor]) -> bool:
        """Whether the output file would hold the safetensors input's tensors as they are."""
        if self.model.format != "safetensors" or self.model.components or not self._writes_as_file():
            return False
        if self.result.prune.dropped or self.result.prune.ema_swapped or self.result.fixed_position_ids:
            return False
        return {name: (lazy.dtype, lazy.shape) for name, lazy in final.items()} == \
            {name: (info.dtype, info.shape) for name, info in self.model.infos.items()}

    def _refuse_a_copy(self, final: Mapping[str, LazyTensor]) -> None:
        """Refuse when what was asked (a dtype, pruning, a CLIP fix) changes nothing."""
        if not (self.options.dtype or self.options.prune or self.options.fix_clip) or not self._copies_input(final):
            return
        reasons = []
        if self.options.dtype:
            reasons.append(f"its float tensors are already {self.options.dtype}"
                           + (" or kept by --keep-fp32" if self.options.keep_fp32 else ""))
        if self.options.prune:
            reasons.append("it has nothing to prune")
        if self.options.fix_clip:
            reasons.append("its CLIP position ids are not broken")
        elif self.result.broken_position_ids:
            reasons.append("CLIP position ids are never cast; --fix-clip rewrites broken ones")
        raise SdkitError(f"{self.model.path}: nothing would change ({', '.join(reasons)}); "
                         "the output would be a copy of the input")

    def _write(self, view: ModelView, converted: Converted, outputs: dict[str, LazyTensor],
               sources: dict[str, list[str]]) -> None:
        final = self._cast(outputs, sources)
        self._refuse_a_copy(final)
        try:
            self._write_output(view, converted, final)
        except OverflowStop:
            self.input_hash.cancel()
            cast = self.result.precision.cast if self.result.precision else []
            found = scan_overflow({name: outputs[name] for name in cast}, NAME_TO_CODE[self.options.dtype or "fp16"])
            raise overflow_error(str(self.model.path), found) from None
        if self.result.precision and self.result.precision.overflow.tensors:
            verb = "clamped" if self.options.overflow == "clamp" else "kept as inf"
            self.result.notes.append(self.result.precision.overflow.summary() + f"; {verb}")
        self.result.tensors = len(final)
        self.result.bytes = _size(self.output)

    def _metadata(self, component: str | None) -> dict[str, str]:
        implementation = DIFFUSERS_IMPLEMENTATION if self.convention == "diffusers" else None
        facts = SpecFacts.from_identity(self.identity, implementation=implementation, resolution=self.resolution,
                                        adapter="vae" if component == "vae" else None)
        carried = {} if self.model.components else dict(self.model.metadata)
        if self.options.dtype:  # the input's quantized layers are plain values now
            carried.pop(METADATA_KEY, None)
        metadata = build_metadata("convert", [self.model.path], self.options.to_json(), facts,
                                  title=self.output.stem, carried=carried,
                                  hashes={str(self.model.path): self.input_hash.placeholder})
        return {**metadata, **self.fp8_metadata}

    def _write_output(self, view: ModelView, converted: Converted, tensors: dict[str, LazyTensor]) -> None:
        component = self._written_component(view)
        as_file = self._writes_as_file()
        if self.convention == "diffusers" and component is None and not view.plain:
            if as_file:
                raise SdkitError(f"{self.output}: a diffusers pipeline is a folder; give a folder path "
                                 "(--to single-file makes one LDM file, --only COMPONENT one component)")
            self._write_pipeline(converted, tensors)
        elif self.convention == "diffusers" and not as_file:
            self.result.written = "folder"
            config = converted.configs[component]
            build_in_partial(self.output, self.options.force, lambda folder: write_component_folder(
                folder, component, tensors, config, self._metadata(component), self.progress,
                self.input_hash.patch))
        else:
            if not as_file:
                raise SdkitError(f"{self.output}: the output must be a .safetensors file")
            if self.convention == "diffusers" and component is not None:
                tensors = stored_tensors(component, tensors)
            if self.convention == "ldm" and component in (None, "unet"):
                tensors = with_schedule_markers(tensors, self.identity)
            write_file(self.output, tensors, self._metadata(component), self.input_hash, self.options.force,
                       self.progress)

    def _write_pipeline(self, converted: Converted, tensors: dict[str, LazyTensor]) -> None:
        self.result.written = "folder"
        config_dir = Path(self.options.config_dir) if self.options.config_dir else (
            self.model.path if self.model.components else None)
        folder = write_pipeline_folder(
            self.output, tensors, converted.configs, converted.layout, prediction=self.identity.prediction,
            zero_snr="zero_terminal_snr" in self.identity.facts,
            metadata_for=self._metadata, config_dir=config_dir, overwrite=self.options.force,
            progress=self.progress, finish=self.input_hash.patch)
        self.result.notes += folder.notes
        for name, where in folder.tokenizers.items():
            self.result.notes.append(f"{name}/ copied from {where}")


def with_schedule_markers(tensors: dict[str, LazyTensor], identity: Identity) -> dict[str, LazyTensor]:
    """A single file says v-prediction and zero terminal SNR only by marker keys (ComfyUI's
    model detection reads `v_pred` and `ztsnr`): add those its model has, as empty tensors."""
    wanted = []
    if identity.prediction == "v" and identity.family == "sdxl-base":
        wanted.append("v_pred")
    if "zero_terminal_snr" in identity.facts:
        wanted.append(ZTSNR_MARKER)
    return {**tensors, **{name: _EMPTY_MARKER for name in wanted if name not in tensors}}


def _empty_tensor() -> "torch.Tensor":
    import torch

    return torch.zeros(0, dtype=torch.float32)


_EMPTY_MARKER = LazyTensor("F32", (0,), _empty_tensor)


def _drawn_size(configs: Mapping[str, Mapping[str, Any]]) -> int | None:
    """Pixels per side the model draws at: the UNet's sample size times the VAE's scale."""
    unet, vae = configs.get("unet") or {}, configs.get("vae") or {}
    latents, levels = unet.get("sample_size"), vae.get("block_out_channels")
    if not isinstance(latents, int) or not isinstance(levels, list) or not levels:
        return None
    return latents * 2 ** (len(levels) - 1)


def write_file(path: Path, tensors: Mapping[str, LazyTensor], metadata: Mapping[str, str],
               input_hash: BackgroundHash, overwrite: bool, progress: Progress | None) -> None:
    """Write a safetensors file whose metadata waits for the input's sha256: the tensors
    stream out while the input is hashed, and the digest is patched into the header
    before the file is renamed into place."""
    if path.is_dir():
        raise SdkitError(f"{path}: is a folder; a .safetensors output is a file")
    write_on_workers(path, tensors, metadata, overwrite=overwrite, progress=progress, finish=input_hash.patch)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0
