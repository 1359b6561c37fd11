"""Kolors: the SDXL UNet design conditioned by ChatGLM3 through a text projection.

Facts: ADM width 5632 (ComfyUI `supported_models.py` Kolors `adm_in_channels`), ChatGLM3
hidden 4096 projected to 2048 by `encoder_hid_proj` (diffusers `text_proj`), the SDXL VAE
and latent scale; Civitai ecosystem "Kolors" (civitai `basemodel.constants.ts`).
"""

from __future__ import annotations

from sdkit.arch.families.encoders import CHATGLM3
from sdkit.arch.families.sdxl import SDXL_LATENT
from sdkit.arch.families.spec import Family

KOLORS = Family(
    name="kolors", title="Kolors", denoiser="unet", context_dim=2048, unet_channels=320,
    adm_channels=5632, unet_levels=3, in_channels=4, latent=SDXL_LATENT, default_resolution=1024,
    modelspec_architecture=None, kohya_base_model_version=None, text_encoders=(CHATGLM3,),
    vae_part="SDXL VAE", prediction="epsilon", derived_from="sdxl-base",
    modelspec_prefixes=("kolors",), civitai_base_models=("Kolors",), air_ecosystem="kolors",
)

FAMILIES = (KOLORS,)
