"""LoRA files between kohya (A1111 / ComfyUI) and diffusers / peft naming.

- kohya: `<kohya name>.lora_down.weight`, `.lora_up.weight`, and `.alpha` (a 0-d tensor;
  the layer's scale is alpha / rank);
- diffusers / peft (what `save_lora_weights` writes): `<component>.<module path>.lora_A.weight`
  (= down) and `.lora_B.weight` (= up), alphas in the `lora_adapter_metadata` metadata as
  one peft `LoraConfig` per component, flattened under `<component>.`: the commonest rank
  and alpha as `r` / `lora_alpha`, the others in `rank_pattern` / `alpha_pattern`.
Factor tensors are copied bit for bit; only names and the place of alpha change. A module
without alpha gets alpha = rank (scale 1), which is what peft and kohya assume.
Module names are resolved on the base model's structure (`sdkit.adapters.lora_names`) and
written as sdkit's LoRA writer names them (`sdkit.adapters.lora_export`).
Plain LoRA / LoCon modules convert; LyCORIS algorithms, Tucker `lora_mid`, DoRA and bias
deltas have no diffusers-side spelling here and are refused with their names.

The diffusers names are for diffusers' `load_lora_weights`. For SD 1.x / 2.x / SDXL bases
ComfyUI and A1111 miss them: ComfyUI's `model_lora_keys_unet` spells diffusers attention
layers `unet.<path>.processor.to_q` (`to_out.0` as `processor.to_out`), A1111 cuts a key at
its first dot and looks up `unet`. Both load kohya names (`lora_unet_…`, `lora_te_…`), so
kohya stays the layout a LoRA keeps unless asked, and writing diffusers names warns.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection

from sdkit.adapters.lora_export import ExportModule, kohya_module_name
from sdkit.adapters.lora_format import LoraFile, LoraModule, parse_lora, plain_lora_problem
from sdkit.adapters.lora_names import Layer, ModelNames, structure_names
from sdkit.arch import Identity
from sdkit.arch.keymaps import diffusers_layout
from sdkit.errors import SdkitError
from sdkit.io import LazyTensor, ModelFile, lazy_tensors, write_safetensors
from sdkit.io.dtypes import NAME_TO_CODE
from sdkit.ops.convert.model import ConvertOptions, ConvertResult
from sdkit.ops.folders import read_config_dir
from sdkit.ops.layout import LAYOUT_OF_FAMILY
from sdkit.ops.precision import OverflowStop, cast_tensors, overflow_error, scan_overflow
from sdkit.ops.recipe_meta import DIFFUSERS_IMPLEMENTATION, LDM_IMPLEMENTATIONS, SpecFacts, build_metadata

if TYPE_CHECKING:
    import torch

ADAPTER_METADATA_KEY = "lora_adapter_metadata"
STYLES = {"single-file": "kohya", "diffusers": "diffusers"}
_SHOWN = 3
_WEBUI_LAYOUTS = ("sd1", "sd2", "sdxl", "sdxl_refiner")  # bases whose WebUI loaders want kohya names
WEBUI_WARNING = ("diffusers-named LoRA layers for SD 1.x / 2.x / SDXL are not found by ComfyUI or A1111 "
                 "(their loaders map kohya names, lora_unet_… / lora_te_…); for them convert with "
                 "--to single-file (kohya)")


def _alpha_tensor(alpha: float) -> "torch.Tensor":
    import torch

    return torch.tensor(alpha, dtype=torch.float32)


def lora_layout(identity: Identity, configs: dict[str, dict]) -> str:
    """The base model's layout: from its configs when given, else the detected family."""
    if configs:
        return diffusers_layout(list(configs), configs)
    layout = LAYOUT_OF_FAMILY.get(identity.family)
    if layout is None:
        raise SdkitError(f"cannot tell which model this LoRA was made for (family {identity.family}); "
                         "give the base model's diffusers folder with --config")
    return layout


def _check_module(module: LoraModule) -> None:
    problem = plain_lora_problem(module)
    if problem:
        raise SdkitError(f"{module.name}: {problem}; only plain LoRA / LoCon modules convert between "
                         "kohya and diffusers names")


def _resolve(lora: LoraFile, names: ModelNames[Layer], layout: str) -> dict[str, Layer]:
    targets, unknown = {}, []
    for name, module in lora.modules.items():
        _check_module(module)
        target, _ = names.resolve(name)
        if target is None:
            unknown.append(name)
        else:
            targets[name] = target
    if unknown:
        shown = ", ".join(unknown[:_SHOWN])
        raise SdkitError(f"{len(unknown)} LoRA modules are not modules of the {layout} base model "
                         f"({shown}); give the base model's diffusers folder with --config")
    if lora.unrecognised:
        key, why = next(iter(lora.unrecognised.items()))
        raise SdkitError(f"{key}: {why} ({len(lora.unrecognised)} keys not understood)")
    return targets


def _alpha(module: LoraModule) -> float:
    """The alpha a converted module carries: the stored one, or the rank (scale 1)."""
    if module.alpha is None or module.alpha == 0:  # kohya reads 0 as "alpha = rank"
        return float(module.rank or 0)
    return module.alpha


def _kohya_name(layer: Layer, layout: str) -> str:
    """The name kohya's trainer gives `layer` of a base of `layout`."""
    module = ExportModule(layer.component, layer.diffusers_path, layer.ldm_path, tensors={})
    return kohya_module_name(module, sdxl=layout.startswith("sdxl"))


def to_kohya(lora: LoraFile, targets: dict[str, Layer], layout: str) -> dict[str, LazyTensor]:
    out: dict[str, LazyTensor] = {}
    for name, module in lora.modules.items():
        kohya = _kohya_name(targets[name], layout)
        out[f"{kohya}.lora_down.weight"] = module.tensors["down"]
        out[f"{kohya}.lora_up.weight"] = module.tensors["up"]
        out[f"{kohya}.alpha"] = LazyTensor("F32", (), partial(_alpha_tensor, _alpha(module)))
    return out


def to_diffusers(lora: LoraFile, targets: dict[str, Layer]) -> tuple[dict[str, LazyTensor], str]:
    """(tensors, `lora_adapter_metadata` JSON) in diffusers / peft naming."""
    out: dict[str, LazyTensor] = {}
    per_component: dict[str, list[tuple[str, int, float]]] = {}
    for name, module in lora.modules.items():
        target = targets[name]
        peft = f"{target.component}.{target.diffusers_path}"
        out[f"{peft}.lora_A.weight"] = module.tensors["down"]
        out[f"{peft}.lora_B.weight"] = module.tensors["up"]
        per_component.setdefault(target.component, []).append(
            (target.diffusers_path, int(module.rank or 0), _alpha(module)))
    return out, adapter_metadata(per_component)


def adapter_metadata(per_component: dict[str, list[tuple[str, int, float]]], dora: Collection[str] = ()) -> str:
    """diffusers' `lora_adapter_metadata`: one peft LoraConfig per component (DoRA for
    those in `dora`), flattened."""
    flat: dict[str, Any] = {}
    for component, modules in sorted(per_component.items()):
        rank = Counter(r for _, r, _ in modules).most_common(1)[0][0]
        alpha = Counter(a for _, _, a in modules).most_common(1)[0][0]
        config = {
            "r": rank, "lora_alpha": alpha,
            "rank_pattern": {path: r for path, r, _ in modules if r != rank},
            "alpha_pattern": {path: a for path, _, a in modules if a != alpha},
            "target_modules": sorted(path for path, _, _ in modules),
            "use_dora": component in dora, "lora_bias": False,
        }
        flat.update({f"{component}.{key}": value for key, value in config.items()})
    return json.dumps(flat, indent=2, sort_keys=True)


def _names_a_transformer(model: ModelFile) -> bool:
    """A LoRA of no known family whose names some transformer family's layers carry."""
    from sdkit.ops.lora.convert import names_a_transformer

    return names_a_transformer(parse_lora(model))


def _check_options(options: ConvertOptions, output: Path) -> None:
    for flag, given in (("--only", options.only), ("--ema", options.ema), ("--fix-clip", options.fix_clip),
                        ("--prune", options.prune)):
        if given:
            raise SdkitError(f"{flag} applies to checkpoints, not to LoRA files")
    if output.suffix.lower() != ".safetensors":
        raise SdkitError(f"{output}: a converted LoRA is written as a .safetensors file")


def _renamed(model: ModelFile, identity: Identity, style: str | None,
             options: ConvertOptions) -> tuple[dict[str, LazyTensor], dict[str, str], str | None]:
    """(tensors, metadata additions, layout) of the output."""
    if style is None:
        return lazy_tensors(model), {}, LAYOUT_OF_FAMILY.get(identity.family)
    lora = parse_lora(model)
    source = lora.prefix_style
    if style == source:
        return lazy_tensors(model), {}, LAYOUT_OF_FAMILY.get(identity.family)
    if source not in ("kohya", "diffusers"):
        raise SdkitError(f"{model.path}: {source}-named LoRA modules cannot be renamed (kohya and "
                         "diffusers names only)")
    configs = read_config_dir(options.config_dir)
    layout = lora_layout(identity, configs)
    targets = _resolve(lora, structure_names(layout, configs), layout)
    if style == "kohya":
        return to_kohya(lora, targets, layout), {}, layout
    tensors, config = to_diffusers(lora, targets)
    return tensors, {ADAPTER_METADATA_KEY: config}, layout


def _refuse_a_copy(model: ModelFile, final: dict[str, LazyTensor], dtype: str) -> None:
    """A cast that casts nothing of a safetensors LoRA kept in its own names is a copy."""
    same = {name: (lazy.dtype, lazy.shape) for name, lazy in final.items()} == \
        {name: (info.dtype, info.shape) for name, info in model.infos.items()}
    if model.format == "safetensors" and same:
        raise SdkitError(f"{model.path}: nothing would change (its float tensors are already {dtype}); "
                         "the output would be a copy of the input")


def _implementation(style: str | None, source: str, layout: str | None) -> str | None:
    """ModelSpec implementation as sd-scripts writes it for kohya LoRA (sgm for SDXL)."""
    if (style or source) == "kohya" and layout and layout.startswith("sdxl"):
        return LDM_IMPLEMENTATIONS["sdxl-base"]
    return DIFFUSERS_IMPLEMENTATION


def _transformer_family(identity: Identity) -> bool:
    """Whether the LoRA is for a transformer denoiser (renamed by `sdkit lora convert`)."""
    from sdkit.arch.families import FAMILIES

    family = FAMILIES.get(identity.family)
    return family is not None and family.key_map is not None


def _convert_transformer(model: ModelFile, identity: Identity, output: Path, options: ConvertOptions,
                         style: str) -> ConvertResult:
    """`--to single-file` / `--to diffusers` of a transformer LoRA: `sdkit lora convert
    --to kohya` / `--to diffusers`."""
    from sdkit.ops.lora.convert import LoraConvertOptions, convert_transformer_lora

    if options.dtype is not None or options.config_dir:
        raise SdkitError("a transformer LoRA is renamed by itself: leave out --dtype and --config "
                         "(sdkit lora convert --to kohya|comfyui|diffusers, then sdkit convert --dtype)")
    done = convert_transformer_lora(model.path, output, LoraConvertOptions(style), overwrite=options.force)
    result = ConvertResult(output, "file", identity.kind, done.family, style)
    result.tensors, result.bytes = done.tensors, output.stat().st_size
    return result


def convert_lora_file(model: ModelFile, identity: Identity, output: Path, options: ConvertOptions,
                      progress: Callable[[int], None] | None) -> ConvertResult:
    """Rename (`--to single-file` = kohya, `--to diffusers`) and / or cast a LoRA file;
    transformer LoRAs go to `sdkit.ops.lora.convert`."""
    _check_options(options, output)
    style = STYLES.get(options.to)
    if style is not None and (_transformer_family(identity) or (identity.family == "unknown" and not options.config_dir
                                                               and _names_a_transformer(model))):
        return _convert_transformer(model, identity, output, options, style)
    tensors, added, layout = _renamed(model, identity, style, options)
    result = ConvertResult(output, "file", identity.kind, identity.family, style or identity.key_convention)
    final = tensors
    if options.dtype is not None:
        final, result.precision = cast_tensors(tensors, NAME_TO_CODE[options.dtype], keep=options.keep_fp32,
                                               policy=options.overflow)
        _refuse_a_copy(model, final, options.dtype)
    if style == "diffusers" and layout in _WEBUI_LAYOUTS:
        result.warnings.append(WEBUI_WARNING)
    # peft alphas describe diffusers names only: kohya files carry theirs in `.alpha` tensors
    carried = {k: v for k, v in model.metadata.items() if style != "kohya" or k != ADAPTER_METADATA_KEY}
    facts = SpecFacts.from_identity(identity, adapter="lora",
                                    implementation=_implementation(style, identity.key_convention, layout))
    metadata = build_metadata("convert", [model.path], options.to_json(), facts, added, title=output.stem,
                              carried=carried, progress=progress)
    try:
        write_safetensors(output, final, metadata, overwrite=options.force, progress=progress)
    except OverflowStop:
        found = scan_overflow({name: tensors[name] for name in result.precision.cast},
                              NAME_TO_CODE[options.dtype or "fp16"])
        raise overflow_error(str(model.path), found) from None
    result.tensors, result.bytes = len(final), output.stat().st_size
    return result
