"""Key layouts: single-file (LDM / A1111) ⇄ diffusers, for whole models and components.

Every model is first seen as a `ModelView`: its tensors named as in a checkpoint of its
layout (LDM keys with the `model.diffusion_model.` / `first_stage_model.` / text-encoder
prefixes, or diffusers `<component>/<key>` names), whatever the file was — a checkpoint, a
diffusers folder, or one component on its own (which gets its component's prefix). The
exact plans of `sdkit.arch.keymaps` then convert it; outputs are `LazyTensor`s that load
and convert one tensor each, so nothing is held beyond the tensor being written.

Standalone components in the single-file convention are written as A1111 / ComfyUI load
them: no checkpoint prefix — a VAE as `encoder.*`, `decoder.*`, `quant_conv.*` (A1111
`.vae.safetensors`), a UNet as `input_blocks.*`, `middle_block.*`, `output_blocks.*`
(ComfyUI's diffusion-model loader), a text encoder as its LDM spelling (`text_model.*`
for CLIP-L, OpenCLIP `transformer.resblocks.*` for SD2 / SDXL bigG, as ComfyUI's CLIP
loader reads both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from sdkit.arch.keymaps import (LAYOUTS, KeyPlan, KeyRecipe, checkpoint_from_ldm, checkpoint_to_ldm,
                                diffusers_layout, infer_clip_config_from_ldm, ldm_layout)
from sdkit.errors import SdkitError, with_article
from sdkit.io import LazyTensor, ModelFile, lazy_tensors
from sdkit.io.byte_span import ByteSpan

if TYPE_CHECKING:
    import torch

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
CONVENTIONS = ("ldm", "diffusers")
LAYOUT_OF_FAMILY = {"sd1": "sd1", "sd2": "sd2", "sdxl-base": "sdxl", "sdxl-refiner": "sdxl_refiner",
                    "playground-v2.5": "sdxl"}
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
_IDENTITY_KIND = {"unet": "unet", "vae": "vae", "text-encoder": "text_encoder"}


@dataclass
class ModelView:
    """A model's tensors named as in a checkpoint of `layout` in `convention`."""

    convention: str  # "ldm" | "diffusers"
    layout: str  # a key of sdkit.arch.keymaps.LAYOUTS
    tensors: dict[str, LazyTensor]
    components: list[str]
    configs: dict[str, dict] = field(default_factory=dict)  # known diffusers configs
    standalone: bool = False  # one component on its own, given its checkpoint prefix
    plain: bool = False  # no model component (a ControlNet, an unknown file): names kept as they are


@dataclass
class Converted:
    """A view converted to another convention, with what the conversion left out."""

    tensors: dict[str, LazyTensor]
    sources: dict[str, tuple[str, ...]]  # output name -> input names it is made from
    configs: dict[str, dict]  # the configs the plans followed
    dropped: list[str]  # input names no output reads
    layout: str


# ---- lazy plans ------------------------------------------------------------------------

def _recipe_shape(recipe: KeyRecipe, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if recipe.kind == "copy":
        return shapes[0]
    if recipe.kind == "reshape":
        return tuple(recipe.arg)
    if recipe.kind == "transpose":
        return shapes[0][::-1]
    if recipe.kind == "concat":
        return (sum(shape[0] for shape in shapes), *shapes[0][1:])
    if recipe.kind == "split":
        return (shapes[0][0] // recipe.arg[1], *shapes[0][1:])
    if recipe.kind == "slice":
        start, stop = recipe.arg
        return ((shapes[0][0] if stop is None else stop) - start, *shapes[0][1:])
    if recipe.kind == "swap":
        return shapes[0]
    if recipe.kind == "arange":
        return (1, recipe.arg)
    if recipe.kind == "fill":  # its source gives the dtype only
        return tuple(recipe.arg[0])
    raise ValueError(f"unknown recipe kind {recipe.kind!r}")


def _apply(recipe: KeyRecipe, inputs: list[LazyTensor]) -> "torch.Tensor":
    return recipe.apply([lazy.load() for lazy in inputs])


def plan_tensors(plan: KeyPlan, tensors: Mapping[str, LazyTensor]) -> dict[str, LazyTensor]:
    """The plan's outputs as lazy tensors over `tensors` (dtype and shape known up front)."""
    out: dict[str, LazyTensor] = {}
    for name, recipe in plan.items():
        inputs = [tensors[source] for source in recipe.sources]
        dtypes = {lazy.dtype for lazy in inputs}
        if len(dtypes) > 1:
            raise SdkitError(f"{recipe.sources[0]}: tensors fused into {name} have different dtypes "
                             f"({', '.join(sorted(dtypes))})")
        dtype = dtypes.pop() if dtypes else "I64"  # only position-id ramps have no input
        shape = _recipe_shape(recipe, [lazy.shape for lazy in inputs])
        out[name] = LazyTensor(dtype, shape, partial(_apply, recipe, inputs), _stored_span(recipe, inputs),
                               _pieces(recipe, inputs))
    return out


def _stored_span(recipe: KeyRecipe, inputs: list[LazyTensor]) -> Callable[[], ByteSpan | None] | None:
    """Where a recipe's output already lies in a file: a copy or reshape stores the source's
    bytes unchanged, a slice of rows a contiguous part of them (the writer copies those
    bytes in the kernel)."""
    if len(inputs) != 1 or inputs[0].span is None:
        return None
    if recipe.kind in ("copy", "reshape"):
        return inputs[0].span
    if recipe.kind == "slice":
        return partial(_row_span, inputs[0], recipe.arg)
    return None


def _row_span(source: LazyTensor, rows: tuple[int, int | None]) -> ByteSpan | None:
    whole = source.span()
    if whole is None or not source.shape:
        return None
    row_bytes = whole.length // source.shape[0]
    start, stop = rows
    stop = source.shape[0] if stop is None else stop
    return ByteSpan(whole.path, whole.fileno, whole.offset + start * row_bytes, (stop - start) * row_bytes)


def _pieces(recipe: KeyRecipe, inputs: list[LazyTensor]) -> Callable[[], Iterator["torch.Tensor"]] | None:
    """A concatenation along dim 0 is its parts one after another: the writer takes them
    in turn instead of a joined copy."""
    if recipe.kind != "concat":
        return None
    return lambda: (lazy.load() for lazy in inputs)


# ---- views -----------------------------------------------------------------------------

def _part(layout: str, component: str):
    for part in LAYOUTS[layout]:
        if part.component == component:
            return part
    raise SdkitError(f"{with_article(layout)} model has no {component}")


def is_ldm_checkpoint(model: ModelFile) -> bool:
    return any(key.startswith(_CHECKPOINT_PREFIXES) for key in model.infos)


def _folder_view(model: ModelFile, identity: Any, component: str | None) -> ModelView:
    configs = dict(model.extra.get("configs") or {})
    if model.extra.get("model_index") is None and len(model.components) == 1:
        # a lone component folder: named after its folder, which says nothing
        (name, part), = model.components.items()
        own = component or (identity.components[0] if identity.components else name)
        tensors = {f"{own}/{key}": lazy for key, lazy in lazy_tensors(part).items()}
        layout = "sdxl" if own == "text_encoder_2" else diffusers_layout([own], {own: configs.get(name, {})})
        return ModelView("diffusers", layout, tensors, [own], {own: configs[name]} if name in configs else {},
                         standalone=True)
    names = [name for name in model.components if name in COMPONENTS]
    tensors = {key: lazy for key, lazy in lazy_tensors(model).items() if key.split("/", 1)[0] in names}
    return ModelView("diffusers", diffusers_layout(names, configs), tensors, names,
                     {name: configs[name] for name in names if name in configs})


def _standalone_convention(model: ModelFile, kind: str) -> tuple[str, str]:
    """(convention, key-map kind) of a lone component file."""
    keys = model.infos
    if kind == "unet":
        return ("ldm" if "input_blocks.0.0.weight" in keys else "diffusers"), "unet"
    if kind == "vae":
        return ("diffusers" if any(k.startswith("decoder.up_blocks.") for k in keys) else "ldm"), "vae"
    if any(k.startswith("transformer.resblocks.") for k in keys):
        return "ldm", "openclip"
    return ("ldm" if any(k.startswith("text_model.") for k in keys) else "diffusers"), "clip"


def _standalone_layout(component: str, family: str, keymap_kind: str) -> str:
    layout = LAYOUT_OF_FAMILY.get(family, "sd1")
    if component == "text_encoder_2":
        return layout if layout.startswith("sdxl") else "sdxl"
    if component == "text_encoder":
        if layout == "sdxl_refiner":
            return "sdxl"
        if keymap_kind == "openclip":
            return "sd2"
    return layout


def _file_view(model: ModelFile, identity: Any, component: str | None) -> ModelView:
    if is_ldm_checkpoint(model):
        layout = ldm_layout(model.infos)
        present = [p.component for p in LAYOUTS[layout] if any(k.startswith(p.prefix) for k in model.infos)]
        return ModelView("ldm", layout, lazy_tensors(model), present)
    kind = _IDENTITY_KIND.get(identity.kind)
    # transformers change layout in sdkit.ops.convert.transformer; here their names are kept
    if kind is None or identity.components == ["transformer"]:
        return ModelView(identity.key_convention, "sd1", lazy_tensors(model), [], plain=True)
    own = component or (identity.components[0] if identity.components else kind)
    if kind == "text_encoder" and not own.startswith("text_encoder"):
        own = "text_encoder"
    convention, keymap_kind = _standalone_convention(model, kind)
    layout = _standalone_layout(own, identity.family, keymap_kind)
    prefix = _part(layout, own).prefix if convention == "ldm" else own + "/"
    tensors = {prefix + key: lazy for key, lazy in lazy_tensors(model).items()}
    return ModelView(convention, layout, tensors, [own], standalone=True)


def model_view(model: ModelFile, identity: Any, component: str | None = None) -> ModelView:
    """The view of `model`; `component` names what a lone component file holds."""
    if model.components:
        return _folder_view(model, identity, component)
    return _file_view(model, identity, component)


def component_prefix(view: ModelView, component: str, convention: str | None = None) -> str:
    """Where `component`'s tensors sit in the view's (or `convention`'s) namespace."""
    if (convention or view.convention) == "diffusers":
        return component + "/"
    return _part(view.layout, component).prefix


# ---- conversions -----------------------------------------------------------------------

def _vae_config_from_diffusers(shapes: Mapping[str, tuple[int, ...]], layout: str) -> dict:
    """An AutoencoderKL config read off diffusers-named VAE shapes."""
    def count(pattern: str) -> int:
        regex = re.compile(pattern)
        return len({m.group(1) for key in shapes if (m := regex.match(key))})

    levels = count(r"encoder\.down_blocks\.(\d+)\.resnets\.0\.conv1\.weight")
    layers = count(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.conv1\.weight")
    needed = ["encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"]
    if not levels or not layers or any(key not in shapes for key in needed):
        raise SdkitError("vae: not a complete diffusers AutoencoderKL (encoder and decoder needed)")
    sdxl = layout.startswith("sdxl")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [shapes[f"encoder.down_blocks.{i}.resnets.{layers - 1}.conv2.weight"][0]
                               for i in range(levels)],
        "layers_per_block": layers,
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.0.") for k in shapes),
        "scaling_factor": 0.13025 if sdxl else 0.18215,
        "sample_size": 1024 if sdxl else 512,
    }


def _inferred_diffusers_config(view: ModelView, component: str) -> dict | None:
    head = component + "/"
    shapes = {k[len(head):]: lazy.shape for k, lazy in view.tensors.items() if k.startswith(head)}
    if component == "vae":
        return _vae_config_from_diffusers(shapes, view.layout)
    if component.startswith("text_encoder"):
        return infer_clip_config_from_ldm(shapes)
    return None  # a UNet's config cannot be read off diffusers names reliably


def _configs_to_ldm(view: ModelView, given: Mapping[str, dict]) -> dict[str, dict]:
    configs = {**view.configs, **given}
    for component in view.components:
        if component not in configs:
            inferred = _inferred_diffusers_config(view, component)
            if inferred is None:
                raise SdkitError(f"{component}: diffusers weights without a config.json; "
                                 "give the model's diffusers folder with --config")
            configs[component] = inferred
    return configs


def convert_view(view: ModelView, convention: str, configs: Mapping[str, dict] | None = None) -> Converted:
    """The view's tensors in `convention` (unchanged when it already is in it).

    `configs` (diffusers component configs) win over the view's own and over inference.
    """
    if view.plain and convention != view.convention:
        raise SdkitError("this file holds no UNet, VAE or text encoder to convert between single-file "
                         "and diffusers layouts")
    if convention not in CONVENTIONS and not view.plain:
        raise ValueError(f"convention must be one of {CONVENTIONS}, not {convention!r}")
    given = dict(configs or {})
    if convention == view.convention:
        sources = {name: (name,) for name in view.tensors}
        return Converted(dict(view.tensors), sources, {**view.configs, **given}, [], view.layout)
    if convention == "diffusers":
        shapes = {name: lazy.shape for name, lazy in view.tensors.items()}
        plan = checkpoint_from_ldm(shapes, {c: given[c] for c in view.components if c in given}, view.layout)
    else:
        plan = checkpoint_to_ldm(view.tensors, _configs_to_ldm(view, given), view.layout)
    sources = {name: recipe.sources for name, recipe in plan.plan.items()}
    return Converted(plan_tensors(plan.plan, view.tensors), sources, plan.configs, list(plan.dropped), plan.layout)


def _strip(tensors: Mapping[str, LazyTensor], prefix: str) -> dict[str, LazyTensor]:
    return {name[len(prefix):]: lazy for name, lazy in tensors.items() if name.startswith(prefix)}


def extract_component(model: ModelFile, component: str, convention: str, *, identity: Any = None,
                      configs: Mapping[str, dict] | None = None) -> dict[str, LazyTensor]:
    """One component of `model` on its own, in `convention` ("ldm" or "diffusers").

    LDM names carry no checkpoint prefix (`encoder.*` for a VAE); diffusers names are the
    component model's own (`down_blocks.*`). SdkitError when the model has no such part.
    """
    from sdkit.arch import identify

    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, not {component!r}")
    view = model_view(model, identity or identify(model), component)
    if component not in view.components:
        raise SdkitError(f"{model.path}: has no {component} (it holds {', '.join(view.components) or 'none'})")
    converted = convert_view(view, convention, configs)
    tensors = _strip(converted.tensors, component_prefix(view, component, convention))
    if not tensors:
        raise SdkitError(f"{model.path}: no {component} tensors")
    return tensors


def replace_component(model: ModelFile, component: str, source: ModelFile, *,
                      identity: Any = None, source_identity: Any = None) -> dict[str, LazyTensor]:
    """`model`'s tensors with `component` taken from `source`, in `model`'s own naming.

    `source` is that component on its own (either convention) or any model holding it.
    The replacement must have exactly the tensors and shapes of the part it replaces.
    """
    from sdkit.arch import identify

    view = model_view(model, identity or identify(model))
    if component not in view.components:
        raise SdkitError(f"{model.path}: has no {component} to replace")
    own_configs = convert_view(view, "diffusers").configs if view.convention == "ldm" else view.configs
    try:  # converted with the model's own config: the part must fit it
        incoming = extract_component(source, component, view.convention,
                                     identity=source_identity, configs=own_configs)
    except SdkitError as exc:
        raise SdkitError(f"{source.path}: its {component} does not fit the model's ({exc})") from None
    prefix = component_prefix(view, component)
    current = _strip(view.tensors, prefix)
    _check_same_part(source, component, current, incoming)
    tensors = {name: lazy for name, lazy in view.tensors.items() if not name.startswith(prefix)}
    tensors.update({prefix + key: lazy for key, lazy in incoming.items()})
    return _strip(tensors, prefix) if view.standalone else tensors


def _check_same_part(source: ModelFile, component: str, current: Mapping[str, LazyTensor],
                     incoming: Mapping[str, LazyTensor]) -> None:
    missing = sorted(set(current) - set(incoming))
    extra = sorted(set(incoming) - set(current))
    if missing or extra:
        example = missing[0] if missing else extra[0]
        raise SdkitError(f"{source.path}: its {component} does not fit the model's ({len(missing)} tensors "
                         f"missing, {len(extra)} not in the model, e.g. {example})")
    for key, lazy in incoming.items():
        if lazy.shape != current[key].shape:
            raise SdkitError(f"{source.path}: {component} tensor {key} has shape {list(lazy.shape)}, "
                             f"the model's {list(current[key].shape)}")
