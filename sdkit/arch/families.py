"""Reference dimensions of the model families sdkit knows.

This table is the one place these constants live: `identify()` compares a file's measured
dimensions with them, and writers take their ModelSpec / kohya strings from here.

Sources: ComfyUI `supported_models.py` / `latent_formats.py` (context dims, model channels,
ADM widths, latent scale and shift), diffusers model configs (VAE scaling factors, Playground
latent statistics), ModelSpec README (architecture strings), sd-scripts `train_network.py`
(`ss_base_model_version`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family, named as the diffusers component holding it."""

    component: str  # "text_encoder" | "text_encoder_2" | "text_encoder_3"
    architecture: str  # "clip" (HF CLIP-L layout) | "openclip" | "t5" | "chatglm"
    width: int


@dataclass(frozen=True)
class Family:
    """Reference dimensions of a released model family."""

    name: str
    title: str
    denoiser: str  # "unet" | "mmdit" | "flux"
    context_dim: int  # cross-attention / text-context width seen by the denoiser
    unet_channels: int  # UNet model_channels, or the transformer hidden size
    adm_channels: int | None  # pooled-vector input (SDXL label_emb, SD3 y, Flux vector_in)
    unet_levels: int | None  # UNet resolution levels; None for transformers
    in_channels: int  # denoiser input channels of the plain (non-inpaint) model
    latent_channels: int
    vae_scaling_factor: float
    vae_shift_factor: float
    default_resolution: int
    modelspec_architecture: str | None
    kohya_base_model_version: str | None
    text_encoders: tuple[TextEncoderSpec, ...]
    other_unet_channels: tuple[int, ...] = ()  # further released sizes (SD3.5 large)
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def accepts_unet_channels(self, channels: int) -> bool:
        return channels == self.unet_channels or channels in self.other_unet_channels


_CLIP_L = TextEncoderSpec("text_encoder", "clip", 768)
_CLIP_G = TextEncoderSpec("text_encoder_2", "openclip", 1280)

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("sd1", "Stable Diffusion 1.x", "unet", 768, 320, None, 4, 4, 4, 0.18215, 0.0, 512,
               "stable-diffusion-v1", "sd_v1", (_CLIP_L,)),
        Family("sd2", "Stable Diffusion 2.x", "unet", 1024, 320, None, 4, 4, 4, 0.18215, 0.0, 512,
               "stable-diffusion-v2-512", "sd_v2",
               (TextEncoderSpec("text_encoder", "openclip", 1024),)),
        Family("sdxl-base", "Stable Diffusion XL base", "unet", 2048, 320, 2816, 3, 4, 4, 0.13025,
               0.0, 1024, "stable-diffusion-xl-v1-base", "sdxl_base_v1-0", (_CLIP_L, _CLIP_G)),
        Family("sdxl-refiner", "Stable Diffusion XL refiner", "unet", 1280, 384, 2560, 4, 4, 4,
               0.13025, 0.0, 1024, "stable-diffusion-xl-v1-refiner", None, (_CLIP_G,)),
        Family("sd3", "Stable Diffusion 3", "mmdit", 4096, 1536, 2048, None, 16, 16, 1.5305, 0.0609,
               1024, "stable-diffusion-v3-medium", None,
               (TextEncoderSpec("text_encoder", "clip", 768), _CLIP_G,
                TextEncoderSpec("text_encoder_3", "t5", 4096)),
               other_unet_channels=(2432,)),
        Family("flux", "FLUX.1", "flux", 4096, 3072, 768, None, 64, 16, 0.3611, 0.1159, 1024,
               "flux-1-dev", "flux1",
               (TextEncoderSpec("text_encoder", "clip", 768),
                TextEncoderSpec("text_encoder_2", "t5", 4096))),
        Family("kolors", "Kolors", "unet", 2048, 320, 5632, 3, 4, 4, 0.13025, 0.0, 1024,
               None, None, (TextEncoderSpec("text_encoder", "chatglm", 4096),)),
        Family("playground-v2.5", "Playground v2.5", "unet", 2048, 320, 2816, 3, 4, 4, 0.5, 0.0,
               1024, None, None, (_CLIP_L, _CLIP_G),
               latents_mean=(-1.6574, 1.886, -1.383, 2.5155),
               latents_std=(8.4927, 5.9022, 6.5498, 5.2299)),
    )
}

# cross-attention width of a UNet adapter -> family (InvokeAI `lora_token_vector_length`)
FAMILY_BY_CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl-base", 1280: "sdxl-refiner"}
# textual-inversion vector width -> family (InvokeAI textual_inversion config)
FAMILY_BY_EMBEDDING_WIDTH = {768: "sd1", 1024: "sd2", 1280: "sdxl-base"}

_MODELSPEC_PREFIXES = (  # most specific first
    ("stable-diffusion-xl-v1-refiner", "sdxl-refiner"),
    ("stable-diffusion-xl", "sdxl-base"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-v3", "sd3"),
    ("stable-diffusion-3", "sd3"),
    ("flux-1", "flux"),
    ("kolors", "kolors"),
    ("playground", "playground-v2.5"),
)


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
    if value.startswith("sdxl"):
        return "sdxl-refiner" if "refiner" in value else "sdxl-base"
    if value.startswith(("sd_v1", "sd_1", "sd1", "ss_v1")):
        return "sd1"
    if value.startswith(("sd_v2", "sd_2", "sd2", "ss_v2")):
        return "sd2"
    if value.startswith("sd3"):
        return "sd3"
    if value.startswith("flux"):
        return "flux"
    return None


def modelspec_architecture(family: str, *, variant: str = "normal", prediction: str = "epsilon",
                           adapter: str | None = None) -> str | None:
    """The `modelspec.architecture` string for a model of this family (None if the spec has none).

    `adapter` is the ModelSpec suffix for adapters: "lora", "textual-inversion", "controlnet".
    """
    ref = FAMILIES[family]
    base = ref.modelspec_architecture
    if base is None:
        return None
    if family == "sd1" and variant == "inpaint":
        base = "stable-diffusion-v1-inpainting"
    elif family == "sd2" and variant in ("inpaint", "depth"):
        base = "stable-diffusion-v2-inpainting" if variant == "inpaint" else "stable-diffusion-v2-depth"
    elif family == "sd2" and prediction == "v":
        base = "stable-diffusion-v2-768-v"
    return f"{base}/{adapter}" if adapter else base


def kohya_base_model_version(family: str, *, prediction: str = "epsilon") -> str | None:
    """The `ss_base_model_version` sd-scripts writes for this family (None where it has none)."""
    version = FAMILIES[family].kohya_base_model_version
    if version is not None and family in ("sd1", "sd2") and prediction == "v":
        return version + "_v"
    return version


def default_resolution(family: str, *, prediction: str = "epsilon") -> int:
    """Side of the square training resolution (SD2 v-prediction models are 768)."""
    if family == "sd2" and prediction == "v":
        return 768
    return FAMILIES[family].default_resolution
