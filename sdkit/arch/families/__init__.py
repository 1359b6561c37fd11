"""The model families sdkit knows, one module each, and the lookups built from them.

Each family module (`sd.py`, `sdxl.py`, `sd3.py`, `flux.py`, `flux2.py`, `chroma.py`,
`kolors.py`, `playground.py`, `z_image.py`, `qwen_image.py`, `lumina2.py`, `hidream.py`,
`wan.py`, `anima.py`) holds what sdkit knows about its family as data (a `Family`,
see `spec.py`): released sizes and variants (`releases`), how its denoiser's keys are named
in each convention with their shapes (`layouts`), the text encoders and VAE it needs, its
latent format, prediction type, ModelSpec architecture strings, the kohya base-model
version, Civitai base-model names and AIR ecosystem — each with the peer source it was
taken from. `identify()` and the writers read these tables; they name no family themselves.

Adding a family:
1. write `sdkit/arch/families/<name>.py` with a module docstring citing the facts and
   `FAMILIES = (Family(...),)`; a transformer family gives its `layouts` (key names and
   shape templates of every convention its files come in) and `releases` (the sizes and
   flags of each released model, `named_by` for releases only metadata can tell apart);
   shared text encoders come from `encoders.py`;
2. add the module to `_MODULES` below (order matters only where two families could claim
   one file: the first listed wins);
3. add fixtures under `fixtures/families/` (a tiny model built from the peer's tiny test
   config, and header-only files with the released key names, shapes and dtypes) and tests
   that each is identified.
"""

from __future__ import annotations

import re
from collections import Counter

from sdkit.arch.families import (anima, chroma, flux, flux2, hidream, kolors, lumina2, playground, qwen_image,
                                 sd, sd3, sdxl, wan, z_image)
from sdkit.arch.families.encoders import DECODER_ARCHITECTURES, RELEASED_ENCODERS
from sdkit.arch.families.spec import (DenoiserLayout, Family, LatentFormat, Release,
                                      TextEncoderSpec)

_MODULES = (sd, sdxl, sd3, flux, flux2, chroma, kolors, playground, z_image, qwen_image, lumina2, hidream, wan,
            anima)

FAMILIES: dict[str, Family] = {family.name: family for module in _MODULES for family in module.FAMILIES}

# cross-attention width of a UNet adapter -> family (InvokeAI `lora_token_vector_length`):
# the widths of the UNet families that are not another family's design
FAMILY_BY_CONTEXT_DIM = {f.context_dim: f.name for f in FAMILIES.values()
                         if f.denoiser == "unet" and f.derived_from is None}
# textual-inversion vector width -> family (InvokeAI textual_inversion config)
FAMILY_BY_EMBEDDING_WIDTH = {f.embedding_width: f.name for f in FAMILIES.values() if f.embedding_width}

# `modelspec.architecture` starts, most specific (longest) first
_MODELSPEC_PREFIXES = sorted(((prefix, f.name) for f in FAMILIES.values() for prefix in f.modelspec_prefixes),
                             key=lambda item: -len(item[0]))


def family_from_modelspec(architecture: str) -> str | None:
    """Family named by a `modelspec.architecture` value ("stable-diffusion-v1/lora" -> sd1)."""
    base = architecture.strip().lower().split("/")[0]
    for prefix, family in _MODELSPEC_PREFIXES:
        if base.startswith(prefix):
            return family
    return None


def family_from_kohya_version(version: str) -> str | None:
    """Family named by `ss_base_model_version`; trainers spell it loosely ("sdxl_", "sd_1.5")."""
    value = version.strip().lower()
    for family in FAMILIES.values():
        if family.kohya_version_pattern and re.match(family.kohya_version_pattern, value):
            return family.name
    return None


def modelspec_architecture(family: str, *, variant: str = "normal", prediction: str = "epsilon",
                           adapter: str | None = None, release: str | None = None) -> str | None:
    """The `modelspec.architecture` string for a model of this family (None if the spec has none).

    `adapter` is the ModelSpec suffix for adapters: "lora", "textual-inversion", "controlnet";
    `release` a release name (`FLUX.1-schnell`) whose own architecture string is preferred.
    """
    ref = FAMILIES[family]
    named = ref.release(release) if release else None
    base = named.modelspec_architecture if named and named.modelspec_architecture else ref.modelspec_architecture
    if base is None:
        return None
    if variant in ref.modelspec_variants:
        base = ref.modelspec_variants[variant]
    elif prediction == "v" and "v-prediction" in ref.modelspec_variants:
        base = ref.modelspec_variants["v-prediction"]
    return f"{base}/{adapter}" if adapter else base


def _civitai_base_model_table() -> dict[str, tuple[str, str | None]]:
    """Civitai `baseModel` (lowercased) -> (family, the one release it names or None).

    A name several releases share ("SD 3.5", "Qwen") or that only the family lists
    ("Pony") names no release. A name two families claim would name neither, so it is
    left out rather than guessed.
    """
    table: dict[str, tuple[str, str | None]] = {}
    claimed_by: dict[str, set[str]] = {}
    for family in FAMILIES.values():
        names = list(family.civitai_base_models)
        names += [n for r in family.releases for n in r.civitai_base_models if n not in names]
        for name in names:
            releases = [r.name for r in family.releases if name in r.civitai_base_models]
            table[name.lower()] = (family.name, releases[0] if len(releases) == 1 else None)
            claimed_by.setdefault(name.lower(), set()).add(family.name)
    return {name: named for name, named in table.items() if len(claimed_by[name]) == 1}


CIVITAI_BASE_MODELS = _civitai_base_model_table()


def family_for_civitai_base_model(base_model: str) -> tuple[str, str | None] | None:
    """(family, release or None) that a Civitai `baseModel` names ("Flux.1 D" ->
    ("flux", "FLUX.1-dev")); None for a name sdkit does not know ("Other")."""
    return CIVITAI_BASE_MODELS.get(base_model.strip().lower())


def civitai_base_models_for(family: str, release: str | None = None) -> tuple[str, ...]:
    """The Civitai `baseModel` names of a release, or of the whole family when no release
    is given or the release has none of its own."""
    ref = FAMILIES.get(family)
    if ref is None:
        return ()
    named = ref.release(release) if release else None
    if named is not None and named.civitai_base_models:
        return named.civitai_base_models
    names = list(ref.civitai_base_models)
    names += [n for r in ref.releases for n in r.civitai_base_models if n not in names]
    return tuple(names)


def kohya_base_model_version(family: str, *, prediction: str = "epsilon") -> str | None:
    """The `ss_base_model_version` sd-scripts writes for this family (None where it has none)."""
    ref = FAMILIES[family]
    version = ref.kohya_base_model_version
    if version is not None and ref.kohya_v_suffix and prediction == "v":
        return version + "_v"
    return version


def default_resolution(family: str, *, prediction: str = "epsilon") -> int:
    """Side of the square training resolution (SD2 v-prediction models are 768)."""
    ref = FAMILIES[family]
    if prediction == "v" and ref.v_prediction_resolution:
        return ref.v_prediction_resolution
    return ref.default_resolution


def _encoder_kind(architecture: str) -> str:
    """HF CLIP and OpenCLIP are two layouts of the same models."""
    return "clip" if architecture in ("clip", "openclip") else architecture


def _released_encoders() -> list[TextEncoderSpec]:
    """Every released encoder sdkit names: the shared table, then any only a family lists."""
    specs = list(RELEASED_ENCODERS)
    parts = {spec.part for spec in specs}
    specs += [spec for f in FAMILIES.values() for spec in f.text_encoders if spec.part not in parts]
    return specs


def encoder_spec(architecture: str, width: int, *, layers: int | None = None, vocab: int | None = None,
                 query_width: int | None = None, kv_width: int | None = None,
                 head_dim: int | None = None, **_: object) -> TextEncoderSpec | None:
    """The released text encoder of this architecture and width (and, where the released one
    states them and they were measured, layer count, vocabulary and attention widths).
    Takes a text encoder's facts as keywords; facts it does not compare are ignored."""
    kind = _encoder_kind(architecture)
    measured = {"layers": layers, "vocab": vocab, "query_width": query_width, "kv_width": kv_width,
                "head_dim": head_dim}
    return next((spec for spec in _released_encoders()
                 if _encoder_kind(spec.architecture) == kind and spec.width == width
                 and _sizes_fit(spec, measured)), None)


def _sizes_fit(spec: TextEncoderSpec, measured: dict[str, int | None]) -> bool:
    stated: dict[str, int | None] = {"layers": spec.layers, "vocab": spec.vocab}
    if spec.heads is not None:
        heads, kv_heads, head_dim = spec.heads
        stated.update(query_width=heads * head_dim, kv_width=kv_heads * head_dim, head_dim=head_dim)
    return all(measured[name] is None or value is None or measured[name] == value
               for name, value in stated.items())


def families_using_encoder(architecture: str, width: int) -> list[str]:
    """Families one of whose text encoders has this architecture and width."""
    kind = _encoder_kind(architecture)
    return [f.name for f in FAMILIES.values()
            if any(_encoder_kind(s.architecture) == kind and s.width == width for s in f.text_encoders)]


def encoder_users(spec: TextEncoderSpec) -> tuple[list[str], list[str]]:
    """(sdkit families, other models) that run with this released encoder."""
    families = [f.name for f in FAMILIES.values() if any(s.part == spec.part for s in family_encoders(f))]
    return families, list(spec.used_outside)


def family_encoders(family: Family) -> list[TextEncoderSpec]:
    """The family's text encoders and those its releases run with instead (FLUX.2 Klein)."""
    return [*family.text_encoders, *(s for release in family.releases for s in release.text_encoders)]


def family_from_pipeline_class(class_name: str) -> str | None:
    """Family named by a diffusers `model_index.json` `_class_name` ("QwenImageEditPipeline")."""
    return next((f.name for f in FAMILIES.values()
                 if f.diffusers_pipeline_pattern and re.fullmatch(f.diffusers_pipeline_pattern, class_name)), None)


def families_with_encoder_kinds(architectures: list[str]) -> list[str]:
    """Families whose text encoders are of exactly these kinds, as many of each (CLIP in
    either layout, T5, ChatGLM), whatever their widths."""
    wanted = Counter(_encoder_kind(a) for a in architectures)
    return [f.name for f in FAMILIES.values()
            if Counter(_encoder_kind(s.architecture) for s in f.text_encoders) == wanted]


def families_with_latent(channels: int, scaling_factor: float | None = None,
                         shift_factor: float | None = None, video: bool = False) -> list[str]:
    """Families one of whose latent spaces has this many channels (and this scale and
    shift), from a 2-D image VAE or, with `video`, a 3-D video VAE."""
    return [f.name for f in FAMILIES.values()
            if any(_latent_fits(latent, channels, scaling_factor, shift_factor, video)
                   for latent, _ in f.latents())]


def _latent_fits(latent: LatentFormat, channels: int, scaling_factor: float | None,
                 shift_factor: float | None, video: bool) -> bool:
    if latent.channels != channels or latent.video != video:
        return False
    if scaling_factor is not None and abs(latent.scaling_factor - scaling_factor) > 1e-6:
        return False
    return shift_factor is None or abs(latent.shift_factor - shift_factor) <= 1e-6


__all__ = [
    "CIVITAI_BASE_MODELS", "DECODER_ARCHITECTURES", "FAMILIES", "FAMILY_BY_CONTEXT_DIM",
    "FAMILY_BY_EMBEDDING_WIDTH", "DenoiserLayout", "Family", "LatentFormat", "Release", "TextEncoderSpec",
    "civitai_base_models_for", "default_resolution", "encoder_spec", "encoder_users", "families_using_encoder",
    "families_with_encoder_kinds", "families_with_latent", "family_encoders", "family_for_civitai_base_model",
    "family_from_kohya_version", "family_from_modelspec", "family_from_pipeline_class", "kohya_base_model_version",
    "modelspec_architecture",
]
