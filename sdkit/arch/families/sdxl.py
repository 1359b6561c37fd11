"""Stable Diffusion XL base and refiner.

Facts: base UNet context 2048 (CLIP-L + CLIP-G concatenated), ADM input
`label_emb.0.0.weight` [1280, 2816], three levels; refiner context 1280 (CLIP-G only),
model channels 384, ADM 2560, four levels (ComfyUI `supported_models.py` SDXL /
SDXLRefiner, formats.md (g)); latent scale 0.13025 (diffusers SDXL VAE config); ModelSpec
`stable-diffusion-xl-v1-base` / `-refiner`; sd-scripts writes `sdxl_base_v1-0`; Civitai
base models (Pony, Illustrious and NoobAI are SDXL children) from civitai
`basemodel.constants.ts`.
"""

from __future__ import annotations

from sdkit.arch.families.encoders import CLIP_G, CLIP_L
from sdkit.arch.families.spec import Family, LatentFormat, Lineage

SDXL_LATENT = LatentFormat(channels=4, scaling_factor=0.13025)

SDXL_BASE = Family(
    name="sdxl-base", title="Stable Diffusion XL base", denoiser="unet", context_dim=2048,
    unet_channels=320, adm_channels=2816, unet_levels=3, in_channels=4, latent=SDXL_LATENT,
    default_resolution=1024, modelspec_architecture="stable-diffusion-xl-v1-base",
    kohya_base_model_version="sdxl_base_v1-0", text_encoders=(CLIP_L, CLIP_G), vae_part="SDXL VAE",
    prediction="epsilon", embedding_width=1280, modelspec_prefixes=("stable-diffusion-xl",),
    kohya_version_pattern=r"sdxl(?!.*refiner)",
    civitai_base_models=("SDXL 1.0", "SDXL Turbo", "Pony", "Illustrious", "NoobAI"),
    air_ecosystem="sdxl", gguf_architecture="sdxl",
    # Civitai files these under their own base models; their weights are SDXL base's. NoobAI
    # is trained from Illustrious, so it is looked for first
    lineages=(Lineage("NoobAI", ("noobai", "noob-ai", "noob_ai"), "NoobAI"),
              Lineage("Illustrious", ("illustrious",), "Illustrious"),
              Lineage("Pony Diffusion", ("pony",), "Pony")),
)

SDXL_REFINER = Family(
    name="sdxl-refiner", title="Stable Diffusion XL refiner", denoiser="unet", context_dim=1280,
    unet_channels=384, adm_channels=2560, unet_levels=4, in_channels=4, latent=SDXL_LATENT,
    default_resolution=1024, modelspec_architecture="stable-diffusion-xl-v1-refiner",
    kohya_base_model_version=None, text_encoders=(CLIP_G,), vae_part="SDXL VAE",
    prediction="epsilon", modelspec_prefixes=("stable-diffusion-xl-v1-refiner",),
    kohya_version_pattern=r"sdxl.*refiner", air_ecosystem="sdxl",
)

FAMILIES = (SDXL_BASE, SDXL_REFINER)
