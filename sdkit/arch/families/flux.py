"""FLUX.1 (Black Forest Labs): a transformer of double-stream and single-stream blocks,
CLIP-L (pooled vector) + T5-XXL (context), a 16-channel VAE; flow matching.

How its files are kept in 2026:
- the diffusion model alone, in BFL / ComfyUI names (`double_blocks.N.*`, `single_blocks.N.*`,
  `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`, `final_layer`), sometimes under
  `model.diffusion_model.`; or in diffusers names (`transformer_blocks.N.*`,
  `single_transformer_blocks.N.*`, `x_embedder`, `context_embedder`, `time_text_embed.*`,
  `proj_out`);
- ComfyUI all-in-one checkpoints: that plus `text_encoders.clip_l.*`, `text_encoders.t5xxl.*`
  and `vae.*` (ComfyUI `supported_models.py` Flux: `vae_key_prefix`, `text_encoder_key_prefix`);
- the VAE alone (`ae.safetensors`): the LDM autoencoder with 16 latent channels and no
  quant convs, the same design as SD3's (so its family is told by metadata or config only).

Facts: released sizes from the diffusers configs of black-forest-labs/FLUX.1-{dev,schnell,
Fill-dev,Depth-dev} (hidden 24 x 128 = 3072, 19 double + 38 single blocks, joint 4096,
pooled 768, in 64 / 384 / 128, out 64, `guidance_embeds` on dev, Fill and Depth); dev vs
schnell by the guidance embedder (diffusers `infer_diffusers_model_type`, ComfyUI
`model_detection.py` `guidance_embed`); latent `(x - 0.1159) * 0.3611` (ComfyUI
`latent_formats.py` Flux); ModelSpec `flux-1-dev` / `flux-1-schnell` and
`ss_base_model_version` `flux1` (sd-scripts); Civitai base models "Flux.1 D", "Flux.1 S",
"Flux.1 Krea", "Flux.1 Kontext" in ecosystems Flux1, FluxKrea, Flux1Kontext (civitai
`basemodel.constants.ts`). Kontext and Krea have dev's keys and shapes: only metadata can
name them. FLUX.2 and Chroma lack `vector_in` and the per-block modulation (`img_mod`) this
layout requires: they are their own families (`flux2.py`, `chroma.py`), never FLUX.1, and
other relatives without them are reported as unknown transformers.
"""

from __future__ import annotations

from dataclasses import replace

from sdkit.arch.families.encoders import CLIP_L, T5_XXL, with_component
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

# sinusoidal timestep / guidance features fed to the time and guidance embedders
_TIME_FEATURES = 256

BFL_LAYOUT = DenoiserLayout(
    convention="ldm",
    markers=("double_blocks.", "single_blocks."),
    shapes={
        "img_in.weight": ("hidden", "in_channels"),
        "txt_in.weight": ("hidden", "context"),
        "time_in.in_layer.weight": ("hidden", _TIME_FEATURES),
        "vector_in.in_layer.weight": ("hidden", "pooled"),
        "double_blocks.0.img_mod.lin.weight": ("6*hidden", "hidden"),
        "double_blocks.0.img_attn.qkv.weight": ("3*hidden", "hidden"),
    },
    optional_shapes={
        "guidance_in.in_layer.weight": ("hidden", _TIME_FEATURES),
        "single_blocks.0.modulation.lin.weight": ("3*hidden", "hidden"),
        "final_layer.linear.weight": ("out_channels", "hidden"),
        "double_blocks.0.img_attn.norm.query_norm.scale": ("head",),
    },
    counts={"double_blocks": r"double_blocks\.(\d+)\.", "single_blocks": r"single_blocks\.(\d+)\."},
    flags={"guidance": "guidance_in."},
)

DIFFUSERS_LAYOUT = DenoiserLayout(
    convention="diffusers",
    markers=("single_transformer_blocks.",),
    shapes={
        "x_embedder.weight": ("hidden", "in_channels"),
        "context_embedder.weight": ("hidden", "context"),
        "time_text_embed.timestep_embedder.linear_1.weight": ("hidden", _TIME_FEATURES),
        "time_text_embed.text_embedder.linear_1.weight": ("hidden", "pooled"),
        "transformer_blocks.0.norm1.linear.weight": ("6*hidden", "hidden"),
        "transformer_blocks.0.attn.to_q.weight": ("hidden", "hidden"),
    },
    optional_shapes={
        "time_text_embed.guidance_embedder.linear_1.weight": ("hidden", _TIME_FEATURES),
        "single_transformer_blocks.0.norm.linear.weight": ("3*hidden", "hidden"),
        "proj_out.weight": ("out_channels", "hidden"),
        "transformer_blocks.0.attn.norm_q.weight": ("head",),
    },
    counts={"double_blocks": r"transformer_blocks\.(\d+)\.",
            "single_blocks": r"single_transformer_blocks\.(\d+)\."},
    flags={"guidance": "time_text_embed.guidance_embedder."},
)

def mlp_embedder(ldm: str, diffusers: str) -> tuple:
    """BFL's `MLPEmbedder` (`in_layer`, `out_layer`) ⇄ diffusers' embedder (`linear_1`, `linear_2`)."""
    return same(f"{ldm}.in_layer", f"{diffusers}.linear_1"), same(f"{ldm}.out_layer", f"{diffusers}.linear_2")


def qk_norms(ldm: str, query: str, key: str) -> tuple:
    """BFL's `QKNorm` scales ⇄ diffusers' `attn.norm_q` / `norm_k` (or `norm_added_*`) weights."""
    return (tensor(f"{ldm}.query_norm.scale", f"attn.{query}.weight"),
            tensor(f"{ldm}.key_norm.scale", f"attn.{key}.weight"))


# BFL names ⇄ diffusers names (diffusers `convert_flux_transformer_checkpoint_to_diffusers`;
# ComfyUI `comfy/utils.py` `flux_to_diffusers`). A single block's `linear1` stacks q, k, v
# (hidden rows each) and the MLP input (the rest); the final modulation is (shift, scale)
# in BFL's order and (scale, shift) in diffusers'.
KEY_MAP = KeyMap(
    places=(
        same("img_in", "x_embedder"), same("txt_in", "context_embedder"),
        *mlp_embedder("time_in", "time_text_embed.timestep_embedder"),
        *mlp_embedder("vector_in", "time_text_embed.text_embedder"),
        *mlp_embedder("guidance_in", "time_text_embed.guidance_embedder"),
        same("final_layer.linear", "proj_out"),
        swapped("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ),
    blocks=(
        BlockMap("double_blocks", "double_blocks.{i}.", "transformer_blocks.{i}.", (
            same("img_mod.lin", "norm1.linear"), same("txt_mod.lin", "norm1_context.linear"),
            fused("img_attn.qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
            fused("txt_attn.qkv", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            *qk_norms("img_attn.norm", "norm_q", "norm_k"),
            *qk_norms("txt_attn.norm", "norm_added_q", "norm_added_k"),
            same("img_attn.proj", "attn.to_out.0"), same("txt_attn.proj", "attn.to_add_out"),
            same("img_mlp.0", "ff.net.0.proj"), same("img_mlp.2", "ff.net.2"),
            same("txt_mlp.0", "ff_context.net.0.proj"), same("txt_mlp.2", "ff_context.net.2"),
        )),
        BlockMap("single_blocks", "single_blocks.{i}.", "single_transformer_blocks.{i}.", (
            same("modulation.lin", "norm.linear"),
            fused("linear1", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp",
                  sizes=("hidden", "hidden", "hidden", None)),
            *qk_norms("norm", "norm_q", "norm_k"),
            same("linear2", "proj_out"),
        )),
    ),
)

# black-forest-labs/FLUX.1-dev transformer/config.json; the rotary axes (time, height,
# width) split the head width, so only a model of the released head width can reuse them
DIFFUSERS_MODEL = DiffusersModel(
    "FluxTransformer2DModel",
    config={"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]},
    measured={"in_channels": "in_channels", "out_channels": "out_channels", "num_layers": "double_blocks",
              "num_single_layers": "single_blocks", "attention_head_dim": "head",
              "num_attention_heads": "hidden/head", "joint_attention_dim": "context",
              "pooled_projection_dim": "pooled", "guidance_embeds": "flag:guidance"},
    unmeasured=("axes_dims_rope",),
)

# what stays in 16-bit in an fp8 FLUX.1: the input embedders and the final layer (as the
# community converter silveroxides/convert_to_quant keeps for Chroma, FLUX.1's relative;
# the released 11.9 GB fp8 files hold every block matrix, modulation included, in fp8)
FP8_KEEP = (r"(img_in|txt_in|time_in|vector_in|guidance_in|final_layer)\.",)

# black-forest-labs/FLUX.1-{dev,schnell} scheduler/scheduler_config.json; FluxPipeline and
# FluxImg2ImgPipeline
SAMPLING = SamplingPipeline(
    "FluxPipeline", {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"},
    schedule={"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
              "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
    undistilled_schedule={"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False},
    guidance="embedded-or-true", packed=True, long_tokenizer="tokenizer_2", img2img_class="FluxImg2ImgPipeline")

_RELEASED = {"hidden": 3072, "context": 4096, "pooled": 768, "out_channels": 64,
             "double_blocks": 19, "single_blocks": 38}
_DEV = dict(_RELEASED, in_channels=64)
_PLAIN = {"in_channels": ("out_channels", 1)}

FLUX = Family(
    implementation="https://github.com/black-forest-labs/flux",
    name="flux", title="FLUX.1", denoiser="flux", context_dim=4096, unet_channels=3072,
    adm_channels=768, unet_levels=None, in_channels=64,
    latent=LatentFormat(channels=16, scaling_factor=0.3611, shift_factor=0.1159),
    default_resolution=1024, modelspec_architecture="flux-1-dev", kohya_base_model_version="flux1",
    kohya_network_module="networks.lora_flux",
    # CLIP-L's hidden state is the pooled vector, T5-XXL's states the context
    text_encoders=(replace(CLIP_L, feeds="pooled"), replace(with_component(T5_XXL, "text_encoder_2"), feeds="context")),
    vae_part="FLUX VAE",
    prediction="flow", modelspec_prefixes=("flux-1",), kohya_version_pattern=r"flux(?![-._ ]?2)",
    civitai_base_models=("Flux.1 D", "Flux.1 S", "Flux.1 Krea", "Flux.1 Kontext"),
    gguf_architecture="flux", air_ecosystem="flux1", layouts=(BFL_LAYOUT, DIFFUSERS_LAYOUT),
    diffusers_pipeline_pattern=r"Flux(?!2)\w*Pipeline", key_map=KEY_MAP,
    diffusers_model=DIFFUSERS_MODEL, fp8_keep=FP8_KEEP, sampling=SAMPLING,
    releases=(
        Release("FLUX.1-dev", dims=_DEV, flags={"guidance": True}, ratios=_PLAIN,
                modelspec_architecture="flux-1-dev", civitai_base_models=("Flux.1 D",),
                air_ecosystem="flux1"),
        Release("FLUX.1-schnell", dims=_DEV, flags={"guidance": False}, ratios=_PLAIN,
                modelspec_architecture="flux-1-schnell", civitai_base_models=("Flux.1 S",),
                air_ecosystem="flux1"),
        Release("FLUX.1-Fill-dev", dims=dict(_RELEASED, in_channels=384), flags={"guidance": True},
                ratios={"in_channels": ("out_channels", 6)}, variant="inpaint",
                air_ecosystem="flux1"),
        Release("FLUX.1-Depth-dev", dims=dict(_RELEASED, in_channels=128), flags={"guidance": True},
                ratios={"in_channels": ("out_channels", 2)}, variant="depth", air_ecosystem="flux1"),
        Release("FLUX.1-Kontext-dev", dims=_DEV, flags={"guidance": True}, ratios=_PLAIN,
                named_by=("kontext",), civitai_base_models=("Flux.1 Kontext",),
                air_ecosystem="flux1kontext"),
        Release("FLUX.1-Krea-dev", dims=_DEV, flags={"guidance": True}, ratios=_PLAIN,
                named_by=("krea",), civitai_base_models=("Flux.1 Krea",), air_ecosystem="fluxkrea"),
    ),
)

FAMILIES = (FLUX,)
