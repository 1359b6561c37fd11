"""Stable Diffusion 1.x and 2.x: a cross-attention UNet, one text encoder, the 4-channel VAE.

Facts: context widths 768 (CLIP-L) / 1024 (OpenCLIP ViT-H) at
`input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight` [320, 768|1024]; SD2 has a Linear
`proj_in` where SD1 has a 1x1 conv (ComfyUI `supported_models.py` SD15 / SD20, A1111
`sd_models_config.py`); latent scale 0.18215 (diffusers `AutoencoderKL` default);
ModelSpec architectures `stable-diffusion-v1`, `-v2-512`, `-v2-768-v` (ModelSpec README);
`ss_base_model_version` `sd_v1`, `sd_v2` with `_v` for v-prediction (sd-scripts); Civitai
base models and ecosystems from civitai `basemodel.constants.ts`. The structural rules that
tell SD1 from SD2 on a model of other sizes live in `sdkit.arch.structure`.
"""

from __future__ import annotations

from sdkit.arch.families.encoders import CLIP_L, OPENCLIP_H
from sdkit.arch.families.spec import Family, LatentFormat

SD_LATENT = LatentFormat(channels=4, scaling_factor=0.18215)

SD1 = Family(
    name="sd1", title="Stable Diffusion 1.x", denoiser="unet", context_dim=768, unet_channels=320,
    adm_channels=None, unet_levels=4, in_channels=4, latent=SD_LATENT, default_resolution=512,
    modelspec_architecture="stable-diffusion-v1", kohya_base_model_version="sd_v1",
    text_encoders=(CLIP_L,), vae_part="SD VAE", prediction="epsilon", embedding_width=768,
    modelspec_prefixes=("stable-diffusion-v1",), kohya_v_suffix=True,
    modelspec_variants={"inpaint": "stable-diffusion-v1-inpainting"}, kohya_version_pattern=r"(sd_v1|sd_1|sd1|ss_v1)",
    civitai_base_models=("SD 1.4", "SD 1.5"), air_ecosystem="sd1", gguf_architecture="sd1",
)

SD2 = Family(
    name="sd2", title="Stable Diffusion 2.x", denoiser="unet", context_dim=1024, unet_channels=320,
    adm_channels=None, unet_levels=4, in_channels=4, latent=SD_LATENT, default_resolution=512,
    modelspec_architecture="stable-diffusion-v2-512", kohya_base_model_version="sd_v2",
    text_encoders=(OPENCLIP_H,), vae_part="SD VAE", prediction="v-or-epsilon",
    embedding_width=1024, modelspec_prefixes=("stable-diffusion-v2",), kohya_v_suffix=True,
    modelspec_variants={"inpaint": "stable-diffusion-v2-inpainting", "depth": "stable-diffusion-v2-depth",
                        "v-prediction": "stable-diffusion-v2-768-v"},
    v_prediction_resolution=768,
    kohya_version_pattern=r"(sd_v2|sd_2|sd2|ss_v2)", civitai_base_models=("SD 2.0", "SD 2.1"),
    air_ecosystem="sd2",
)

FAMILIES = (SD1, SD2)
