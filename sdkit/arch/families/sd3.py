"""Stable Diffusion 3 and 3.5: an MMDiT of joint blocks, CLIP-L + CLIP-G + T5-XXL, a
16-channel VAE.

Facts: `x_embedder.proj.weight` [hidden, 16, 2, 2], `context_embedder.weight` [hidden, 4096],
`y_embedder.mlp.0.weight` [hidden, 2048]; 3 Medium and 3.5 Medium have hidden 1536 and 24
joint blocks, 3.5 Medium adds a second image attention (`x_block.attn2`), 3.5 Large has
hidden 2432 and 38 blocks (diffusers `single_file_utils` fingerprints `sd3`,
`sd35_large`; ComfyUI `model_detection.py` mmdit); latent `(x - 0.0609) * 1.5305`
(ComfyUI `latent_formats.py` SD3); ModelSpec `stable-diffusion-v3-medium`, sd-scripts
writes `stable-diffusion-3-…`; Civitai base models from civitai `basemodel.constants.ts`.
"""

from __future__ import annotations

from sdkit.arch.families.encoders import CLIP_G, CLIP_L, T5_XXL
from sdkit.arch.families.spec import DenoiserLayout, Family, LatentFormat, Release

SD3_LATENT = LatentFormat(channels=16, scaling_factor=1.5305, shift_factor=0.0609)

SGM_LAYOUT = DenoiserLayout(
    convention="ldm",
    markers=("joint_blocks.",),
    shapes={
        "x_embedder.proj.weight": ("hidden", "in_channels", None, None),
        "context_embedder.weight": ("hidden", "context"),
        "y_embedder.mlp.0.weight": ("hidden", "pooled"),
    },
    optional_shapes={
        "joint_blocks.0.x_block.attn.qkv.weight": ("3*hidden", "hidden"),
        "joint_blocks.0.context_block.attn.qkv.weight": ("3*hidden", "hidden"),
    },
    counts={"depth": r"joint_blocks\.(\d+)\."},
    flags={"dual_attention": "joint_blocks.0.x_block.attn2."},
)

DIFFUSERS_LAYOUT = DenoiserLayout(
    convention="diffusers",
    markers=("pos_embed.proj.",),
    shapes={
        "pos_embed.proj.weight": ("hidden", "in_channels", None, None),
        "context_embedder.weight": ("hidden", "context"),
        "time_text_embed.text_embedder.linear_1.weight": ("hidden", "pooled"),
    },
    optional_shapes={"transformer_blocks.0.attn.to_q.weight": ("hidden", "hidden")},
    counts={"depth": r"transformer_blocks\.(\d+)\."},
    flags={"dual_attention": "transformer_blocks.0.attn2."},
)

_SHARED = {"context": 4096, "pooled": 2048, "in_channels": 16}

SD3 = Family(
    name="sd3", title="Stable Diffusion 3", denoiser="mmdit", context_dim=4096, unet_channels=1536,
    adm_channels=2048, unet_levels=None, in_channels=16, latent=SD3_LATENT, default_resolution=1024,
    modelspec_architecture="stable-diffusion-v3-medium", kohya_base_model_version=None,
    text_encoders=(CLIP_L, CLIP_G, T5_XXL), vae_part="SD3 VAE", prediction="flow",
    other_unet_channels=(2432,), modelspec_prefixes=("stable-diffusion-v3", "stable-diffusion-3"),
    kohya_version_pattern=r"sd3", civitai_base_models=("SD 3", "SD 3.5"), air_ecosystem="sd3",
    diffusers_pipeline_pattern=r"StableDiffusion3\w*Pipeline", gguf_architecture="sd3",
    layouts=(SGM_LAYOUT, DIFFUSERS_LAYOUT),
    releases=(
        Release("Stable Diffusion 3 Medium", dims={**_SHARED, "hidden": 1536, "depth": 24},
                flags={"dual_attention": False}, modelspec_architecture="stable-diffusion-v3-medium",
                civitai_base_models=("SD 3",)),
        Release("Stable Diffusion 3.5 Medium", dims={**_SHARED, "hidden": 1536, "depth": 24},
                flags={"dual_attention": True}, civitai_base_models=("SD 3.5",),
                air_ecosystem="sd3_5m"),
        Release("Stable Diffusion 3.5 Large", dims={**_SHARED, "hidden": 2432, "depth": 38},
                flags={"dual_attention": False}, civitai_base_models=("SD 3.5",)),
        Release("Stable Diffusion 3.5 Large Turbo", dims={**_SHARED, "hidden": 2432, "depth": 38},
                flags={"dual_attention": False}, named_by=("turbo",),
                civitai_base_models=("SD 3.5",)),
    ),
)

FAMILIES = (SD3,)
