"""Decide a family from measured structure, and list where dimensions leave the family's.

Real files are decided by their exact widths (ComfyUI / A1111 / InvokeAI rules); a tiny model
with other widths is decided by what the families differ in structurally:
- SD1: cross-attention UNet, no ADM input, one HF CLIP text encoder, 1x1-conv `proj_in`;
- SD2: as SD1 but OpenCLIP (or a `gelu` HF encoder in diffusers) and Linear `proj_in`;
- SDXL base: ADM input (`label_emb` / `add_embedding`) and two text encoders;
- SDXL refiner: ADM input and only the OpenCLIP bigG encoder;
- Kolors: ADM width 5632 or a text projection (`encoder_hid_proj`); Playground v2.5: EDM
  latent statistics.
Transformer families are told by the layouts their modules declare (`fingerprint`); their
sizes are compared with the family's releases.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdkit.arch.components import TextEncoderFacts, VaeFacts
from sdkit.arch.denoiser import DenoiserFacts
from sdkit.arch.families import (DECODER_ARCHITECTURES, FAMILIES, encoder_spec, encoder_users, family_encoders,
                                 families_with_encoder_kinds, families_with_latent)
from sdkit.arch.fingerprint import match_release

RELEASED_VAE_CHANNELS = 128  # first conv width of every released SD / SDXL / SD3 / Flux VAE
_REFINER_TIME_IDS = 5  # refiner ADM = pooled text + 5 size/score embeddings (base: 6)
_T5_KINDS = ("t5", "umt5")


@dataclass
class StructureHints:
    """Facts from outside the weights that settle what weights alone cannot."""

    playground: bool = False
    kolors: bool = False
    refiner: bool | None = None  # pipeline says so (requires_aesthetics_score, encoders)
    sd2_text_encoder: bool = False  # diffusers encoder config uses `gelu` (SD2) not `quick_gelu`
    addition_time_embed_dim: int | None = None  # diffusers UNet config
    vae_latent: tuple[float, float] | None = None  # diffusers VAE config (scaling, shift)


def denoiser_family(denoiser: DenoiserFacts, encoders: list[TextEncoderFacts],
                    hints: StructureHints) -> str:
    if denoiser.family is not None:
        return denoiser.family
    if hints.kolors or denoiser.adm_channels == 5632 or denoiser.encoder_hid_dim:
        return "kolors"
    if denoiser.adm_channels is not None:
        if denoiser.context_dim == 1024:
            return "sd2"  # SD2 unCLIP: image-embedding ADM on an SD2 UNet
        if hints.playground:
            return "playground-v2.5"
        return "sdxl-refiner" if _is_refiner(denoiser, encoders, hints) else "sdxl-base"
    if denoiser.context_dim in (768, 1024):
        return "sd1" if denoiser.context_dim == 768 else "sd2"
    first = next((e for e in encoders if e.component == "text_encoder"), None)
    if first is not None:
        return "sd2" if first.architecture == "openclip" or hints.sd2_text_encoder else "sd1"
    return "sd2" if denoiser.linear_projection else "sd1"


def _is_refiner(denoiser: DenoiserFacts, encoders: list[TextEncoderFacts],
                hints: StructureHints) -> bool:
    if hints.refiner is not None:
        return hints.refiner
    if (denoiser.context_dim, denoiser.adm_channels) == (1280, 2560):
        return True
    if encoders:
        return all(e.component == "text_encoder_2" for e in encoders)
    step = hints.addition_time_embed_dim
    if step and denoiser.context_dim and denoiser.adm_channels:
        # the refiner's pooled text width equals its context width (both bigG)
        return denoiser.adm_channels - denoiser.context_dim == _REFINER_TIME_IDS * step
    return False


def text_encoder_family(encoders: list[TextEncoderFacts], hints: StructureHints) -> str:
    """Family of a file holding only text encoders (a lone bigG reads as SDXL base).

    With a T5 among them, the kinds of encoders must be one family's exactly (a CLIP and
    a T5 is FLUX.1, two CLIPs and a T5 SD3); a lone T5-XXL serves SD3, FLUX.1 and Chroma alike, so names none.
    A decoder language model names the one model that runs with it, where only one does
    and sdkit knows it: Gemma-2-2B is Lumina 2's, but Qwen3-4B serves Z-Image and FLUX.2
    [klein] 4B alike, so names none."""
    components = {e.component for e in encoders}
    if any(e.architecture in DECODER_ARCHITECTURES for e in encoders):
        families, others = shared_encoder_users(encoders)
        return families[0] if len(families) == 1 and not others else "unknown"
    if any(e.architecture in _T5_KINDS for e in encoders):
        if len(encoders) == 1 and encoders[0].architecture == "t5":
            return "unknown"  # a lone T5-XXL serves SD3, FLUX.1, Chroma, HiDream
        matching = families_with_encoder_kinds([e.architecture for e in encoders])
        return matching[0] if len(matching) == 1 else "unknown"
    if "text_encoder_2" in components or any(e.width == 1280 for e in encoders):
        return "sdxl-base"
    if hints.sd2_text_encoder or any(e.width == 1024 or e.architecture == "openclip" for e in encoders):
        return "sd2"
    return "sd1"


def shared_encoder_users(encoders: list[TextEncoderFacts]) -> tuple[list[str], list[str]]:
    """(sdkit families, other models) that run with every one of these encoders; nothing
    where one of them is no released encoder."""
    families: list[str] | None = None
    others: list[str] | None = None
    for encoder in encoders:
        spec = encoder_spec(**encoder.to_facts())
        if spec is None:
            return [], []
        mine, outside = encoder_users(spec)
        families = mine if families is None else [f for f in families if f in mine]
        others = outside if others is None else [o for o in others if o in outside]
    return families or [], others or []


def dimension_mismatches(family: str, denoiser: DenoiserFacts | None,
                         encoders: list[TextEncoderFacts], vae: VaeFacts | None) -> list[str]:
    """Human-readable differences between measured and released dimensions."""
    ref = FAMILIES.get(family)
    found: list[str] = []
    if ref is not None and denoiser is not None:
        found += _denoiser_mismatches(family, denoiser)
    if ref is not None:
        widths: dict[str, list[int]] = {}
        for spec in family_encoders(ref):  # a release may run with another encoder (FLUX.2 Klein)
            widths.setdefault(spec.component, []).append(spec.width)
        for encoder in encoders:
            released = widths.get(encoder.component)
            if released and encoder.width not in released:
                found.append(f"{encoder.component} width {encoder.width} ({family} has {released[0]})")
    if vae is not None:
        found += vae_mismatches(vae, family)
    return found


def _denoiser_mismatches(family: str, denoiser: DenoiserFacts) -> list[str]:
    ref = FAMILIES[family]
    if denoiser.dims is not None and ref.releases:  # a transformer: its sizes against the releases
        return match_release(ref, denoiser.dims, denoiser.flags or {}).mismatches
    name = "UNet" if denoiser.architecture == "unet" else "transformer"
    found = []
    if not ref.accepts_unet_channels(denoiser.channels):
        found.append(f"{name} width {denoiser.channels} ({family} has {ref.unet_channels})")
    if denoiser.context_dim is not None and denoiser.context_dim != ref.context_dim:
        found.append(f"context width {denoiser.context_dim} ({family} has {ref.context_dim})")
    if ref.adm_channels and denoiser.adm_channels and denoiser.adm_channels != ref.adm_channels:
        found.append(f"ADM input {denoiser.adm_channels} ({family} has {ref.adm_channels})")
    if ref.unet_levels and denoiser.levels and denoiser.levels != ref.unet_levels:
        found.append(f"UNet levels {denoiser.levels} ({family} has {ref.unet_levels})")
    return found


def vae_mismatches(vae: VaeFacts, family: str) -> list[str]:
    ref = FAMILIES.get(family)
    found = []
    channels = [latent.channels for latent, _ in ref.latents()] if ref is not None else []
    released = sorted({latent.channels for f in FAMILIES.values() if f.vae_part
                       for latent, _ in f.latents() if not latent.video})
    if ref is not None and not ref.vae_part:
        found.append(f"a VAE ({family} works in pixel space and uses none)")
    elif ref is not None and vae.latent_channels not in channels:
        found.append(f"VAE latent channels {vae.latent_channels} ({family} has {ref.latent_channels})")
    elif ref is None and not vae.video and vae.latent_channels not in released:
        found.append(f"VAE latent channels {vae.latent_channels} (released VAEs have "
                     + ", ".join(map(str, released[:-1])) + f" or {released[-1]})")
    elif ref is not None and ref.latent.batch_norm and vae.latent_norm_channels is None:
        found.append(f"no latent BatchNorm statistics bn.running_mean / bn.running_var "
                     f"({ref.vae_part} has them)")
    # video VAEs have widths of their own (Wan 2.1: 96; 2.2: 160 in, 256 out)
    if not vae.video and vae.channels != RELEASED_VAE_CHANNELS:
        found.append(f"VAE width {vae.channels} (released VAEs have {RELEASED_VAE_CHANNELS})")
    return found


def vae_compatible_families(vae: VaeFacts) -> list[str]:
    """Families one of whose latent spaces has this VAE's channel count, image or video
    alike (SD1/SD2/SDXL VAEs are architecturally identical, as are SD3's and Flux's);
    pixel-space families use none."""
    return [name for name in families_with_latent(vae.latent_channels, video=vae.video)
            if FAMILIES[name].vae_part]
