"""What a file is and what it needs, in words, from its Identity and the family tables.

`part` names the file as people do ("FLUX.1-dev diffusion model", "T5-XXL encoder",
"16-channel VAE …"); `needs` lists the released parts a denoiser runs with that the file
does not hold ("CLIP-L", "T5-XXL", "FLUX VAE"); `summary` is the one line of both with the
precision. Nothing is guessed: a family the weights cannot tell is said to be unknown.
"""

from __future__ import annotations

from sdkit.arch.families import FAMILIES, Family, encoder_spec
from sdkit.arch.identity import Identity

_ADAPTER_KINDS = ("lora", "embedding", "hypernetwork")
_DENOISER_COMPONENTS = ("unet", "transformer")


def describe(identity: Identity) -> None:
    """Fill in `part`, `needs` and `summary` (after kind, family, facts and precision)."""
    identity.part = identity.part or part_of(identity)
    identity.needs = needs_of(identity)
    identity.summary = summary_of(identity)


def part_of(identity: Identity) -> str:
    ref = FAMILIES.get(identity.family)
    kind = identity.kind
    if kind in ("unet", "checkpoint"):
        return _model_part(identity, ref)
    if kind == "text-encoder":
        return _encoders_part(identity)
    if kind == "vae":
        return _vae_part(identity, ref)
    if kind == "controlnet":
        return f"ControlNet for {ref.title}" if ref else "ControlNet of an unknown family"
    if kind in _ADAPTER_KINDS:
        what = f"{identity.adapter_type} adapter" if kind == "lora" and identity.adapter_type else kind
        return f"{what} for {ref.title}" if ref else f"{what} of an unknown family"
    unknown = identity.facts.get("unknown_transformer")
    return unknown["description"] if unknown else "unknown file"


def _model_part(identity: Identity, ref: Family | None) -> str:
    has_denoiser = any(c in identity.components for c in _DENOISER_COMPONENTS)
    if identity.kind == "checkpoint":
        noun = "checkpoint" if has_denoiser else "checkpoint without a diffusion model"
    else:
        noun = "UNet" if ref is None or ref.denoiser == "unet" else "diffusion model"
    if ref is None:
        return f"{noun} of an unknown family"
    release, design = identity.facts.get("release"), identity.facts.get("design")
    if release:
        return f"{release} {noun}"
    if design:
        return f"{ref.title} {noun} ({design} design, non-standard dimensions)"
    variant = f" {identity.variant}" if identity.variant != "normal" else ""
    unusual = " (non-standard dimensions)" if identity.nonstandard else ""
    return f"{ref.title}{variant} {noun}{unusual}"


def _encoders_part(identity: Identity) -> str:
    encoders = identity.facts.get("text_encoders") or []
    names = []
    for encoder in encoders:
        spec = encoder_spec(**encoder)
        names.append(spec.part if spec else f"{encoder['architecture']} (width {encoder['width']})")
    if len(encoders) == 1 and encoders[0]["architecture"] in ("t5", "umt5"):
        return f"{names[0]} encoder"
    return " + ".join(names) + (" text encoders" if len(names) > 1 else " text encoder")


def _vae_part(identity: Identity, ref: Family | None) -> str:
    channels = identity.facts.get("latent_channels")
    if ref is not None:
        return ref.vae_part_for(channels) if channels else ref.vae_part
    designs = list(dict.fromkeys(FAMILIES[name].vae_part_for(channels)
                                 for name in identity.facts.get("compatible_families") or []))
    noun = "video VAE" if (identity.facts.get("vae") or {}).get("video") else "VAE"
    if not designs:
        return f"{noun} with {channels} latent channels (no known family's)"
    if len(designs) == 1:
        return f"{channels}-channel {noun} ({designs[0]} design)"
    return (f"{channels}-channel {noun} ({' / '.join(designs)} design: "
            "the weights alone do not tell which)")


def needs_of(identity: Identity) -> list[str]:
    """The released parts a model of this family runs with that the file lacks: the text
    encoders of its release (FLUX.2 Klein's differ from dev's) or of its family, and the VAE
    (none for a pixel-space model)."""
    ref = FAMILIES.get(identity.family)
    if ref is None or identity.kind not in ("unet", "checkpoint"):
        return []
    present = set(identity.components)
    needs = []
    if not present & set(_DENOISER_COMPONENTS):
        needs.append(f"{ref.title} diffusion model")
    release = ref.release(identity.facts.get("release") or identity.facts.get("design") or "")
    encoders = (release.text_encoders if release else ()) or ref.text_encoders
    needs += [spec.part or spec.component for spec in encoders if spec.component not in present]
    if release is not None and release.image_encoder and "image_encoder" not in present:
        needs.append(release.image_encoder)
    vae_part = (release.vae_part if release else None) or ref.vae_part
    if "vae" not in present and vae_part:
        needs.append(vae_part)
    return needs


def summary_of(identity: Identity) -> str:
    text = identity.part
    if identity.precision.label and identity.kind != "unknown":
        text += f", {identity.precision.label}"
    if identity.needs:
        text += "; needs: " + ", ".join(identity.needs)
    return text
