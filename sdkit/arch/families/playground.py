"""Playground v2.5: the SDXL design with an EDM schedule and its own latent statistics.

Facts: `edm_mean` / `edm_std` tensors in single files, VAE `scaling_factor` 0.5 with
per-channel `latents_mean` / `latents_std` (diffusers playground-v2.5 VAE config, ComfyUI
`latent_formats.py` SDXL_Playground_2_5); Civitai ecosystem "PlaygroundV2".
"""

from __future__ import annotations

from sdkit.arch.families.encoders import CLIP_G, CLIP_L
from sdkit.arch.families.spec import Family, LatentFormat

PLAYGROUND_V2_5 = Family(
    name="playground-v2.5", title="Playground v2.5", denoiser="unet", context_dim=2048,
    unet_channels=320, adm_channels=2816, unet_levels=3, in_channels=4,
    latent=LatentFormat(channels=4, scaling_factor=0.5,
                        latents_mean=(-1.6574, 1.886, -1.383, 2.5155),
                        latents_std=(8.4927, 5.9022, 6.5498, 5.2299)),
    default_resolution=1024, modelspec_architecture=None, kohya_base_model_version=None,
    text_encoders=(CLIP_L, CLIP_G), vae_part="SDXL VAE", prediction="edm",
    derived_from="sdxl-base", modelspec_prefixes=("playground",),
    civitai_base_models=("Playground v2",), air_ecosystem="playgroundv2",
)

FAMILIES = (PLAYGROUND_V2_5,)
