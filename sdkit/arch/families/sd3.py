"""Stable Diffusion 3 and 3.5: an MMDiT of joint blocks, CLIP-L + CLIP-G + T5-XXL, a
16-channel VAE.

Facts: `x_embedder.proj.weight` [hidden, 16, 2, 2], `context_embedder.weight` [hidden, 4096],
`y_embedder.mlp.0.weight` [hidden, 2048]; 3 Medium and 3.5 Medium have hidden 1536 and 24
joint blocks, 3.5 Medium adds a second image attention (`x_block.attn2`), 3.5 Large has
hidden 2432 and 38 blocks (diffusers `single_file_utils` fingerprints `sd3`,
`sd35_large`; ComfyUI `model_detection.py` mmdit); latent `(x - 0.0609) * 1.5305`
(ComfyUI `latent_formats.py` SD3); ModelSpec `stable-diffusion-v3-medium`, sd-scripts
writes `stable-diffusion-3-…`; Civitai base models from civitai `basemodel.constants.ts`.

Key map: Stability's MMDiT names ⇄ diffusers `SD3Transformer2DModel` as diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers` and ComfyUI's `comfy/utils.py`
`mmdit_to_diffusers` pair them. The last joint block's context side is "pre-only": it
keeps its attention inputs and a two-part modulation (shift, scale), which diffusers holds
as (scale, shift) in `norm1_context`, and has no output projection or MLP.
"""

from __future__ import annotations

from sdkit.arch.families.encoders import CLIP_G, CLIP_L, T5_XXL
from sdkit.arch.families.spec import (
    BlockMap,
    DenoiserLayout,
    DiffusersModel,
    Family,
    KeyMap,
    LatentFormat,
    Release,
    SamplingPipeline,
    fused,
    same,
    swapped,
    tensor,
)

SD3_LATENT = LatentFormat(channels=16, scaling_factor=1.5305, shift_factor=0.0609)

SGM_LAYOUT = DenoiserLayout(
    convention="ldm",
    markers=("joint_blocks.",),
    shapes={
        "x_embedder.proj.weight": ("hidden", "in_channels", "patch", "patch"),
        "context_embedder.weight": ("hidden", "context"),
        "y_embedder.mlp.0.weight": ("hidden", "pooled"),
    },
    optional_shapes={
        "joint_blocks.0.x_block.attn.qkv.weight": ("3*hidden", "hidden"),
        "joint_blocks.0.context_block.attn.qkv.weight": ("3*hidden", "hidden"),
        # patch x patch x output channels per token
        "final_layer.linear.weight": ("out_features", "hidden"),
    },
    counts={"depth": r"joint_blocks\.(\d+)\."},
    flags={"dual_attention": "joint_blocks.0.x_block.attn2."},
)

DIFFUSERS_LAYOUT = DenoiserLayout(
    convention="diffusers",
    markers=("pos_embed.proj.",),
    shapes={
        "pos_embed.proj.weight": ("hidden", "in_channels", "patch", "patch"),
        "context_embedder.weight": ("hidden", "context"),
        "time_text_embed.text_embedder.linear_1.weight": ("hidden", "pooled"),
    },
    optional_shapes={"transformer_blocks.0.attn.to_q.weight": ("hidden", "hidden"),
                     "proj_out.weight": ("out_features", "hidden")},
    counts={"depth": r"transformer_blocks\.(\d+)\."},
    flags={"dual_attention": "transformer_blocks.0.attn2."},
)


def _mlp(ldm: str, diffusers: str) -> tuple:
    return same(f"{ldm}.mlp.0", f"{diffusers}.linear_1"), same(f"{ldm}.mlp.2", f"{diffusers}.linear_2")


def _qk_norms(ldm: str, query: str, key: str) -> tuple:
    """SD3.5's RMS norms of queries and keys (absent from SD3 Medium: skipped there)."""
    return same(f"{ldm}.ln_q", query, ("weight",)), same(f"{ldm}.ln_k", key, ("weight",))


# Places absent from a file (SD3 Medium's norms, 3.5 Medium's second attention outside its
# first 13 blocks, the last block's context output) are skipped by the plan.
KEY_MAP = KeyMap(
    places=(
        tensor("pos_embed", "pos_embed.pos_embed"), same("x_embedder.proj", "pos_embed.proj"),
        *_mlp("t_embedder", "time_text_embed.timestep_embedder"),
        *_mlp("y_embedder", "time_text_embed.text_embedder"),
        same("context_embedder", "context_embedder"),
        same("final_layer.linear", "proj_out"),
        swapped("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ),
    blocks=(
        BlockMap("depth", "joint_blocks.{i}.", "transformer_blocks.{i}.", (
            same("x_block.adaLN_modulation.1", "norm1.linear"),
            same("context_block.adaLN_modulation.1", "norm1_context.linear"),
            fused("x_block.attn.qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
            fused("context_block.attn.qkv", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            *_qk_norms("x_block.attn", "attn.norm_q", "attn.norm_k"),
            *_qk_norms("context_block.attn", "attn.norm_added_q", "attn.norm_added_k"),
            same("x_block.attn.proj", "attn.to_out.0"), same("context_block.attn.proj", "attn.to_add_out"),
            fused("x_block.attn2.qkv", "attn2.to_q", "attn2.to_k", "attn2.to_v"),
            *_qk_norms("x_block.attn2", "attn2.norm_q", "attn2.norm_k"),
            same("x_block.attn2.proj", "attn2.to_out.0"),
            same("x_block.mlp.fc1", "ff.net.0.proj"), same("x_block.mlp.fc2", "ff.net.2"),
            same("context_block.mlp.fc1", "ff_context.net.0.proj"), same("context_block.mlp.fc2", "ff_context.net.2"),
        ), last=(swapped("context_block.adaLN_modulation.1", "norm1_context.linear"),)),
    ),
)

# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json. The head width
# shows only where the norms are (3.5), so heads, the position table's side, the norms and
# the second attention's blocks come from the release (`Release.config`).
DIFFUSERS_MODEL = DiffusersModel(
    "SD3Transformer2DModel",
    config={"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
            "dual_attention_layers": [], "qk_norm": None},
    measured={"patch_size": "patch", "in_channels": "in_channels", "out_channels": "out_features/patch/patch",
              "num_layers": "depth", "joint_attention_dim": "context", "caption_projection_dim": "hidden",
              "pooled_projection_dim": "pooled"},
    unmeasured=("attention_head_dim", "num_attention_heads", "pos_embed_max_size", "dual_attention_layers",
                "qk_norm"),
)

# stabilityai/stable-diffusion-3.5-medium and -3.5-large transformer/config.json
_MEDIUM_35 = {"pos_embed_max_size": 384, "qk_norm": "rms_norm", "dual_attention_layers": list(range(13))}
_LARGE_35 = {"num_attention_heads": 38, "qk_norm": "rms_norm"}

# StableDiffusion3Pipeline; stabilityai/stable-diffusion-3-medium-diffusers and -3.5-large
# scheduler/scheduler_config.json (shift 3, no resolution-dependent shift)
SAMPLING = SamplingPipeline(
    "StableDiffusion3Pipeline", {"text_encoder": "CLIPTextModelWithProjection",
                                 "text_encoder_2": "CLIPTextModelWithProjection", "text_encoder_3": "T5EncoderModel"},
    schedule={"num_train_timesteps": 1000, "shift": 3.0}, max_sequence_length=256, long_tokenizer="tokenizer_3",
    unprojected_pools=("text_encoder",), img2img_class="StableDiffusion3Img2ImgPipeline")

_SHARED = {"context": 4096, "pooled": 2048, "in_channels": 16}

SD3 = Family(
    implementation="https://github.com/Stability-AI/generative-models",
    name="sd3", title="Stable Diffusion 3", denoiser="mmdit", context_dim=4096, unet_channels=1536,
    adm_channels=2048, unet_levels=None, in_channels=16, latent=SD3_LATENT, default_resolution=1024,
    modelspec_architecture="stable-diffusion-v3-medium", kohya_base_model_version=None,
    kohya_network_module="networks.lora_sd3",
    text_encoders=(CLIP_L, CLIP_G, T5_XXL), vae_part="SD3 VAE", prediction="flow",
    other_unet_channels=(2432,), modelspec_prefixes=("stable-diffusion-v3", "stable-diffusion-3"),
    kohya_version_pattern=r"sd3", civitai_base_models=("SD 3", "SD 3.5"), air_ecosystem="sd3",
    diffusers_pipeline_pattern=r"StableDiffusion3\w*Pipeline", gguf_architecture="sd3",
    layouts=(SGM_LAYOUT, DIFFUSERS_LAYOUT), key_map=KEY_MAP, diffusers_model=DIFFUSERS_MODEL, sampling=SAMPLING,
    checkpoint_vae_root="first_stage_model.",
    # fp8: the embedders and the final layer stay in 16 bits (sdkit's rule for MMDiT
    # designs, as for FLUX.1; no peer publishes an SD3 list)
    fp8_keep=(r"(x_embedder|context_embedder|t_embedder|y_embedder|pos_embed|final_layer)\.",),
    releases=(
        Release("Stable Diffusion 3 Medium", dims={**_SHARED, "hidden": 1536, "depth": 24},
                flags={"dual_attention": False}, modelspec_architecture="stable-diffusion-v3-medium",
                civitai_base_models=("SD 3",)),
        Release("Stable Diffusion 3.5 Medium", dims={**_SHARED, "hidden": 1536, "depth": 24},
                flags={"dual_attention": True}, civitai_base_models=("SD 3.5",),
                air_ecosystem="sd3_5m", config=_MEDIUM_35),
        Release("Stable Diffusion 3.5 Large", dims={**_SHARED, "hidden": 2432, "depth": 38},
                flags={"dual_attention": False}, civitai_base_models=("SD 3.5",), config=_LARGE_35),
        Release("Stable Diffusion 3.5 Large Turbo", dims={**_SHARED, "hidden": 2432, "depth": 38},
                flags={"dual_attention": False}, named_by=("turbo",),
                civitai_base_models=("SD 3.5",), config=_LARGE_35),
    ),
)

FAMILIES = (SD3,)
