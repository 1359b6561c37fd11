"""Component plans from actual keys, and whole-checkpoint plans with the single-file prefixes.

Single-file (LDM / A1111) prefixes by layout:
- sd1: `model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.` (HF CLIP)
- sd2: text encoder at `cond_stage_model.model.` (OpenCLIP)
- sdxl: `conditioner.embedders.0.transformer.` (CLIP-L, HF) + `conditioner.embedders.1.model.`
  (OpenCLIP bigG)
- sdxl_refiner: `conditioner.embedders.0.model.` (OpenCLIP bigG only)
The diffusers side names tensors `<component>/<key>` (`unet/conv_in.weight`), as ModelFile
does for diffusers folders.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

from sdkit.arch.keymaps.clip import clip_plan_for_keys
from sdkit.arch.keymaps.infer import infer_clip_config_from_ldm, infer_unet_config_from_ldm, infer_vae_config_from_ldm
from sdkit.arch.keymaps.recipe import KeyPlan, KeyRecipe, dropped_keys
from sdkit.arch.keymaps.unet import unet_plan_for_keys
from sdkit.arch.keymaps.vae import vae_plan_for_keys
from sdkit.errors import SdkitError

COMPONENT_KINDS = ("unet", "vae", "clip", "openclip")  # "clip": the HF-layout LDM spelling


@dataclass(frozen=True)
class Part:
    """One component of a single-file checkpoint."""

    component: str  # diffusers component name
    prefix: str  # LDM key prefix
    kind: str  # one of COMPONENT_KINDS


_UNET = Part("unet", "model.diffusion_model.", "unet")
_VAE = Part("vae", "first_stage_model.", "vae")
LAYOUTS: dict[str, tuple[Part, ...]] = {
    "sd1": (_UNET, _VAE, Part("text_encoder", "cond_stage_model.transformer.", "clip")),
    "sd2": (_UNET, _VAE, Part("text_encoder", "cond_stage_model.model.", "openclip")),
    "sdxl": (_UNET, _VAE, Part("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
             Part("text_encoder_2", "conditioner.embedders.1.model.", "openclip")),
    "sdxl_refiner": (_UNET, _VAE, Part("text_encoder_2", "conditioner.embedders.0.model.", "openclip")),
}
# SDXL time ids: original size and crop, then target size (base: 6) or aesthetic score (refiner: 5)
_TIME_IDS = {"sdxl": 6, "sdxl_refiner": 5}


def plan_for(component: str, config: Mapping[str, Any], keys: Iterable[str], direction: str) -> KeyPlan:
    """The plan for the tensors `keys` of one component (unprefixed names on both sides).

    `component` is one of COMPONENT_KINDS. Outputs whose inputs are absent are left out;
    input keys the other layout has no place for are left out where documented (see the
    component modules) and refused otherwise.
    """
    if component == "unet":
        return unet_plan_for_keys(config, keys, direction)
    if component == "vae":
        return vae_plan_for_keys(config, keys, direction)
    if component in ("clip", "openclip"):
        return clip_plan_for_keys(config, keys, direction, "hf" if component == "clip" else "openclip")
    raise ValueError(f"component must be one of {COMPONENT_KINDS}, not {component!r}")


@dataclass(frozen=True)
class CheckpointPlan:
    """A whole-checkpoint plan and what it was derived from."""

    layout: str  # a key of LAYOUTS
    plan: KeyPlan  # output key -> recipe
    configs: dict[str, dict]  # diffusers component -> the config the plan follows
    dropped: tuple[str, ...]  # input keys no output reads (EMA, scheduler buffers, ...)


def ldm_layout(keys: Iterable[str]) -> str:
    """Which single-file layout the keys follow, told by where the text encoders sit."""
    keys = list(keys)
    for layout, marker in (("sdxl", "conditioner.embedders.1.model."),
                           ("sdxl_refiner", "conditioner.embedders.0.model."),
                           ("sd2", "cond_stage_model.model."), ("sd1", "cond_stage_model.transformer.")):
        if any(key.startswith(marker) for key in keys):
            return layout
    # no text encoder: only the UNet tells, and its map is the same in every layout
    return "sdxl" if "model.diffusion_model.label_emb.0.0.weight" in keys else "sd1"


def diffusers_layout(components: Iterable[str], configs: Mapping[str, Mapping[str, Any]]) -> str:
    """Which single-file layout a diffusers model maps to, told by its text encoders."""
    components = set(components)
    if "text_encoder_2" in components:
        return "sdxl" if "text_encoder" in components else "sdxl_refiner"
    if "text_encoder" in components:
        # OpenCLIP (SD2) was trained with GELU, OpenAI's CLIP-L (SD1) with quick GELU
        return "sd2" if configs.get("text_encoder", {}).get("hidden_act") == "gelu" else "sd1"
    return "sd1"


def _parts(layout: str) -> tuple[Part, ...]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, not {layout!r}")
    return LAYOUTS[layout]


def _with_prefix(recipe: KeyRecipe, prefix: str) -> KeyRecipe:
    return replace(recipe, sources=tuple(prefix + source for source in recipe.sources))


def checkpoint_from_ldm(shapes: Mapping[str, Sequence[int]], configs: Mapping[str, Mapping[str, Any]] | None = None,
                        layout: str | None = None) -> CheckpointPlan:
    """Plan a single-file checkpoint's conversion to diffusers `<component>/<key>` names.

    A component's config comes from `configs` when given there, else from its shapes.
    """
    layout = layout or ldm_layout(shapes)
    chosen = _configs_for_ldm(shapes, dict(configs or {}), layout)
    plan: KeyPlan = {}
    for part in _parts(layout):
        if part.component not in chosen:
            continue
        keys = [key[len(part.prefix):] for key in shapes if key.startswith(part.prefix)]
        sub = plan_for(part.kind, chosen[part.component], keys, "ldm_to_diffusers")
        plan.update({f"{part.component}/{key}": _with_prefix(r, part.prefix) for key, r in sub.items()})
    return CheckpointPlan(layout, plan, chosen, tuple(dropped_keys(plan, shapes)))


def _configs_for_ldm(shapes: Mapping[str, Sequence[int]], given: dict[str, Any], layout: str) -> dict[str, dict]:
    """Configs of the components present: given ones win, the others are inferred.

    Text encoders come first: SDXL's UNet config needs the pooled text width.
    """
    present = [p for p in _parts(layout) if any(key.startswith(p.prefix) for key in shapes)]
    chosen: dict[str, dict] = {}
    for part in sorted(present, key=lambda p: p.kind == "unet"):
        config = given.get(part.component)
        if config is None:
            config = _infer(part, shapes, layout, chosen)
        chosen[part.component] = dict(config)
    return chosen


def _infer(part: Part, shapes: Mapping[str, Sequence[int]], layout: str, known: dict[str, dict]) -> dict:
    if part.kind == "vae":
        if layout in _TIME_IDS:  # SDXL
            return infer_vae_config_from_ldm(shapes, part.prefix, scaling_factor=0.13025, sample_size=1024)
        return infer_vae_config_from_ldm(shapes, part.prefix)
    if part.kind == "unet":
        return infer_unet_config_from_ldm(shapes, part.prefix, _time_embed_dim(shapes, layout, known))
    config = infer_clip_config_from_ldm(shapes, part.prefix)
    if layout == "sd2":
        # SD2 reads OpenCLIP's penultimate layer; diffusers models that as a CLIPTextModel
        # one layer short, without the projection
        config.update(num_hidden_layers=config["num_hidden_layers"] - 1, architectures=["CLIPTextModel"])
    return config


def _time_embed_dim(shapes: Mapping[str, Sequence[int]], layout: str, known: dict[str, dict]) -> int:
    """SDXL's addition_time_embed_dim: (label_emb input − pooled text width) / time ids."""
    label = shapes.get("model.diffusion_model.label_emb.0.0.weight")
    pooled = known.get("text_encoder_2", {}).get("projection_dim")
    if label is None or pooled is None or layout not in _TIME_IDS:
        return 256
    width, rest = divmod(label[1] - pooled, _TIME_IDS[layout])
    return width if width > 0 and not rest else 256


def checkpoint_to_ldm(keys: Iterable[str], configs: Mapping[str, Mapping[str, Any]],
                      layout: str | None = None) -> CheckpointPlan:
    """Plan a diffusers model's (`<component>/<key>` names) conversion to one single file."""
    keys = list(keys)
    components = {key.split("/", 1)[0] for key in keys if "/" in key}
    layout = layout or diffusers_layout(components, configs)
    plan: KeyPlan = {}
    used: dict[str, dict] = {}
    for part in _parts(layout):
        head = part.component + "/"
        own = [key[len(head):] for key in keys if key.startswith(head)]
        if not own:
            continue
        if part.component not in configs:
            raise SdkitError(f"{part.component}: no config given for this component")
        used[part.component] = dict(configs[part.component])
        sub = plan_for(part.kind, used[part.component], own, "diffusers_to_ldm")
        plan.update({part.prefix + key: _with_prefix(r, head) for key, r in sub.items()})
    return CheckpointPlan(layout, plan, used, tuple(dropped_keys(plan, keys)))
