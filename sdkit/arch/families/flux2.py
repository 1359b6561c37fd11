"""FLUX.2 (Black Forest Labs): FLUX.2-dev and FLUX.2 Klein 4B / 9B. A transformer of
double-stream and single-stream blocks like FLUX.1's, but modulated once for the whole model
(`double_stream_modulation_img` / `_txt`, `single_stream_modulation`) instead of in every
block, with no pooled-vector input, no biases, a SwiGLU MLP (ratio 3), a decoder LLM's
hidden states as context and a 32-channel VAE whose latents are patchified 2x2 (128 input
channels) and normalized by the VAE's own BatchNorm statistics; flow matching.

How its files are kept:
- the diffusion model alone in BFL / ComfyUI names (`img_in`, `txt_in`, `time_in`,
  `guidance_in`, `double_stream_modulation_img.lin`, `double_blocks.N.img_attn.qkv`,
  `single_blocks.N.linear1`, `final_layer`), sometimes under `model.diffusion_model.`; or in
  diffusers names (`x_embedder`, `context_embedder`, `time_guidance_embed.*`,
  `double_stream_modulation_img.linear`, `transformer_blocks.N.attn.to_q`,
  `single_transformer_blocks.N.attn.to_qkv_mlp_proj`, `proj_out`);
- the VAE alone: the LDM autoencoder with 32 latent channels, its quant convs inside the
  encoder and decoder (`encoder.quant_conv`, `decoder.post_quant_conv`) and the latent
  BatchNorm statistics (`bn.running_mean` / `bn.running_var` over 4 x 32 = 128 channels);
  diffusers `AutoencoderKLFlux2` keeps the same statistics under `bn.`.

Facts: sizes from BFL flux2 `model.py` (`Flux2Params`, `Klein4BParams`, `Klein9BParams`, as
copied into musubi-tuner): dev hidden 6144 (48 x 128), 8 double + 48 single blocks, context
15360 (3 x Mistral's 5120), guidance embedder; Klein 4B hidden 3072, 5 + 20 blocks, context
7680 (3 x Qwen3-4B's 2560); Klein 9B hidden 4096, 8 + 24 blocks, context 12288 (3 x
Qwen3-8B's 4096); Klein has no guidance embedder; in and out 128 everywhere. The key names
are those diffusers' `convert_flux2_transformer_checkpoint_to_diffusers` maps and ComfyUI's
`model_detection.py` tests (`double_stream_modulation_img.lin.weight`). Klein base
(undistilled) and Klein distilled share every key and shape: only metadata names them.
ModelSpec strings as musubi-tuner writes them (`Flux.2-dev`, `Flux.2-klein-4b`,
`Flux.2-klein-9b`); Civitai base models and ecosystems from civitai `basemodel.constants.ts`.
A FLUX.2 file has neither FLUX.1's `vector_in` nor its per-block `img_mod`, so it is never
taken for FLUX.1.
"""

from __future__ import annotations

from sdkit.arch.families.encoders import MISTRAL_SMALL_31, QWEN3_4B, QWEN3_8B
from sdkit.arch.families.flux import mlp_embedder, qk_norms
from sdkit.arch.families.spec import (BlockMap, DenoiserLayout, DiffusersModel, Family, KeyMap, LatentFormat, Release,
                                      fused, same, swapped)

_TIME_FEATURES = 256  # sinusoidal timestep / guidance features (`timestep_guidance_channels`)

BFL_LAYOUT = DenoiserLayout(
    convention="ldm",
    markers=("double_stream_modulation_img.", "single_stream_modulation."),
    shapes={
        "img_in.weight": ("hidden", "in_channels"),
        "txt_in.weight": ("hidden", "context"),
        "time_in.in_layer.weight": ("hidden", _TIME_FEATURES),
        "double_stream_modulation_img.lin.weight": ("6*hidden", "hidden"),
        "single_stream_modulation.lin.weight": ("3*hidden", "hidden"),
        "double_blocks.0.img_attn.qkv.weight": ("3*hidden", "hidden"),
    },
    optional_shapes={
        "guidance_in.in_layer.weight": ("hidden", _TIME_FEATURES),
        "double_stream_modulation_txt.lin.weight": ("6*hidden", "hidden"),
        "final_layer.linear.weight": ("out_channels", "hidden"),
        "double_blocks.0.img_attn.norm.query_norm.scale": ("head",),
    },
    counts={"double_blocks": r"double_blocks\.(\d+)\.", "single_blocks": r"single_blocks\.(\d+)\."},
    flags={"guidance": "guidance_in."},
)

DIFFUSERS_LAYOUT = DenoiserLayout(
    convention="diffusers",
    markers=("double_stream_modulation_img.", "single_stream_modulation."),
    shapes={
        "x_embedder.weight": ("hidden", "in_channels"),
        "context_embedder.weight": ("hidden", "context"),
        "time_guidance_embed.timestep_embedder.linear_1.weight": ("hidden", _TIME_FEATURES),
        "double_stream_modulation_img.linear.weight": ("6*hidden", "hidden"),
        "single_stream_modulation.linear.weight": ("3*hidden", "hidden"),
        "transformer_blocks.0.attn.to_q.weight": ("hidden", "hidden"),
    },
    optional_shapes={
        "time_guidance_embed.guidance_embedder.linear_1.weight": ("hidden", _TIME_FEATURES),
        "double_stream_modulation_txt.linear.weight": ("6*hidden", "hidden"),
        "proj_out.weight": ("out_channels", "hidden"),
        "transformer_blocks.0.attn.norm_q.weight": ("head",),
    },
    counts={"double_blocks": r"transformer_blocks\.(\d+)\.",
            "single_blocks": r"single_transformer_blocks\.(\d+)\."},
    flags={"guidance": "time_guidance_embed.guidance_embedder."},
)


# BFL names ⇄ diffusers names (diffusers `convert_flux2_transformer_checkpoint_to_diffusers`).
# Only the double blocks' qkv are cut: a single block's `linear1` (q, k, v and the SwiGLU
# input) stays one tensor in diffusers (`to_qkv_mlp_proj`), and the SwiGLU halves keep their
# order. The final modulation is (shift, scale) in BFL's order, (scale, shift) in diffusers'.
# FLUX.2 has no biases; the map names them anyway, as absent parameters are skipped.
KEY_MAP = KeyMap(
    places=(
        same("img_in", "x_embedder"), same("txt_in", "context_embedder"),
        *mlp_embedder("time_in", "time_guidance_embed.timestep_embedder"),
        *mlp_embedder("guidance_in", "time_guidance_embed.guidance_embedder"),
        same("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
        same("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
        same("single_stream_modulation.lin", "single_stream_modulation.linear"),
        same("final_layer.linear", "proj_out"),
        swapped("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ),
    blocks=(
        BlockMap("double_blocks", "double_blocks.{i}.", "transformer_blocks.{i}.", (
            fused("img_attn.qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
            fused("txt_attn.qkv", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            *qk_norms("img_attn.norm", "norm_q", "norm_k"),
            *qk_norms("txt_attn.norm", "norm_added_q", "norm_added_k"),
            same("img_attn.proj", "attn.to_out.0"), same("txt_attn.proj", "attn.to_add_out"),
            same("img_mlp.0", "ff.linear_in"), same("img_mlp.2", "ff.linear_out"),
            same("txt_mlp.0", "ff_context.linear_in"), same("txt_mlp.2", "ff_context.linear_out"),
        )),
        BlockMap("single_blocks", "single_blocks.{i}.", "single_transformer_blocks.{i}.", (
            same("linear1", "attn.to_qkv_mlp_proj"), same("linear2", "attn.to_out"),
            *qk_norms("norm", "norm_q", "norm_k"),
        )),
    ),
)

# black-forest-labs/FLUX.2-dev transformer/config.json. The rotary axes split the head width
# and the MLP ratio shows only as a quotient of widths: a model of other sizes needs its own.
DIFFUSERS_MODEL = DiffusersModel(
    "Flux2Transformer2DModel",
    config={"patch_size": 1, "in_channels": 128, "out_channels": None, "num_layers": 8, "num_single_layers": 48,
            "attention_head_dim": 128, "num_attention_heads": 48, "joint_attention_dim": 15360,
            "timestep_guidance_channels": _TIME_FEATURES, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32],
            "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": True},
    measured={"in_channels": "in_channels", "out_channels": "out_channels", "num_layers": "double_blocks",
              "num_single_layers": "single_blocks", "attention_head_dim": "head",
              "num_attention_heads": "hidden/head", "joint_attention_dim": "context",
              "guidance_embeds": "flag:guidance"},
    unmeasured=("axes_dims_rope", "mlp_ratio"),
)

_PLAIN = {"in_channels": ("out_channels", 1)}
_IO = {"in_channels": 128, "out_channels": 128}
_DEV = dict(_IO, hidden=6144, context=15360, double_blocks=8, single_blocks=48)
_KLEIN_4B = dict(_IO, hidden=3072, context=7680, double_blocks=5, single_blocks=20)
_KLEIN_9B = dict(_IO, hidden=4096, context=12288, double_blocks=8, single_blocks=24)

FLUX2 = Family(
    implementation="https://github.com/black-forest-labs/flux2",
    name="flux2", title="FLUX.2", denoiser="flux", context_dim=15360, unet_channels=6144,
    adm_channels=None, unet_levels=None, in_channels=128,
    latent=LatentFormat(channels=32, scaling_factor=1.0, batch_norm=True),
    default_resolution=1024, modelspec_architecture=None, kohya_base_model_version=None,
    text_encoders=(MISTRAL_SMALL_31,), vae_part="FLUX.2 VAE", prediction="flow",
    other_unet_channels=(3072, 4096), modelspec_prefixes=("flux.2", "flux-2", "flux2"),
    kohya_version_pattern=r"flux[-._ ]?2",
    civitai_base_models=("Flux.2 D", "Flux.2 Klein 9B", "Flux.2 Klein 9B-base", "Flux.2 Klein 4B",
                         "Flux.2 Klein 4B-base"),
    air_ecosystem="flux2", diffusers_pipeline_pattern=r"Flux2\w*Pipeline", layouts=(BFL_LAYOUT, DIFFUSERS_LAYOUT),
    key_map=KEY_MAP, diffusers_model=DIFFUSERS_MODEL,
    # fp8: the shared stream modulation, the embedders and the final layer stay in 16 bits
    # (the FLUX.2 list of silveroxides/convert_to_quant, the community fp8 converter)
    gguf_architecture="flux",  # what ComfyUI-GGUF's convert.py detects
    fp8_keep=(r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation|"
              r"guidance_in|time_in|img_in|txt_in|final_layer)\.",),
    releases=(
        Release("FLUX.2-dev", dims=_DEV, flags={"guidance": True}, ratios=_PLAIN,
                modelspec_architecture="Flux.2-dev", civitai_base_models=("Flux.2 D",),
                air_ecosystem="flux2"),
        Release("FLUX.2-klein-4B", dims=_KLEIN_4B, flags={"guidance": False}, ratios=_PLAIN,
                text_encoders=(QWEN3_4B,), modelspec_architecture="Flux.2-klein-4b",
                civitai_base_models=("Flux.2 Klein 4B",), air_ecosystem="flux2klein_4b"),
        Release("FLUX.2-klein-base-4B", dims=_KLEIN_4B, flags={"guidance": False}, ratios=_PLAIN,
                named_by=("base",), text_encoders=(QWEN3_4B,),
                civitai_base_models=("Flux.2 Klein 4B-base",), air_ecosystem="flux2klein_4b_base"),
        Release("FLUX.2-klein-9B", dims=_KLEIN_9B, flags={"guidance": False}, ratios=_PLAIN,
                text_encoders=(QWEN3_8B,), modelspec_architecture="Flux.2-klein-9b",
                civitai_base_models=("Flux.2 Klein 9B",), air_ecosystem="flux2klein_9b"),
        Release("FLUX.2-klein-base-9B", dims=_KLEIN_9B, flags={"guidance": False}, ratios=_PLAIN,
                named_by=("base",), text_encoders=(QWEN3_8B,),
                civitai_base_models=("Flux.2 Klein 9B-base",), air_ecosystem="flux2klein_9b_base"),
    ),
)

FAMILIES = (FLUX2,)
