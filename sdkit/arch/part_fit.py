"""Which separate files a lone diffusion model runs with, and whether a file is one of them.

A diffusion model kept alone (ComfyUI's `models/diffusion_models`) needs the text encoders
and the VAE of its family's design: for FLUX.1 a CLIP-L, a T5-XXL and the FLUX VAE. A text
encoder fits when it has the encoder's architecture and the width the diffusion model
reads (measured on the model where the family says which dimension it feeds, so the
encoders of a model of any size are found the same way); a VAE fits when its latent has the
family's channels and its design is one the family uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdkit.arch.families import FAMILIES
from sdkit.arch.families.spec import Family, TextEncoderSpec
from sdkit.arch.identity import Identity

# bytes per value of a dominant dtype: files of wider values are preferred
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class NeededPart:
    """One separate file a diffusion model needs."""

    component: str  # the diffusers component it becomes: "text_encoder", "text_encoder_2", "vae"
    kind: str       # the library kind of such files: "text-encoder" | "vae"
    name: str       # what people call it: "CLIP-L", "FLUX VAE"
    family: str
    architecture: str = ""  # text encoders: the design and width a file must have
    width: int = 0
    latent_channels: int = 0  # VAEs: the latent's channels

    @property
    def option(self) -> str:
        return "--vae" if self.kind == "vae" else "--text-encoder"

    @property
    def title(self) -> str:
        return self.name if self.kind == "vae" else f"{self.name} text encoder"

    @property
    def design(self) -> str:
        """The design in words, for messages."""
        if self.kind == "vae":
            return f"{self.latent_channels}-channel latent"
        return f"{self.architecture}, width {self.width}"

    def fits(self, identity: Identity) -> bool:
        if identity.kind != self.kind:
            return False
        if self.kind == "vae":
            facts = identity.facts
            families = facts.get("compatible_families") or [identity.family]
            return facts.get("latent_channels") == self.latent_channels and self.family in families \
                and not (facts.get("vae") or {}).get("video")
        encoders = identity.facts.get("text_encoders") or []
        return len(encoders) == 1 and encoders[0].get("architecture") == self.architecture \
            and encoders[0].get("width") == self.width


def takes_parts(identity: Identity) -> bool:
    """Whether the file is a diffusion model alone, of a family whose parts are known."""
    family = FAMILIES.get(identity.family)
    return identity.kind == "unet" and family is not None and bool(family.text_encoders or family.vae_part)


def needed_parts(identity: Identity) -> list[NeededPart]:
    """The text encoders and VAE a diffusion model alone needs, in component order."""
    family = FAMILIES[identity.family]
    release = family.release(identity.facts.get("release") or identity.facts.get("design") or "")
    encoders = (release.text_encoders if release else ()) or family.text_encoders
    dims = (identity.facts.get("denoiser") or {}).get("dims") or {}
    parts = [_encoder_part(spec, family, dims) for spec in encoders]
    vae_part = (release.vae_part if release else None) or family.vae_part
    if vae_part:
        latent = (release.latent if release else None) or family.latent
        parts.append(NeededPart("vae", "vae", vae_part, family.name, latent_channels=latent.channels))
    return parts


def _encoder_part(spec: TextEncoderSpec, family: Family, dims: dict) -> NeededPart:
    width = dims.get(spec.feeds, spec.width) if spec.feeds else spec.width
    return NeededPart(spec.component, "text-encoder", spec.part or spec.component, family.name,
                      architecture=spec.architecture, width=int(width))


def value_bytes(identity: Identity) -> int:
    """Bytes per value of the file's dominant dtype (0 for block-quantized files)."""
    return _DTYPE_BYTES.get(identity.precision.dominant or "", 0)
