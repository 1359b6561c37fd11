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
from sdkit.arch.families.spec import DenoiserLayout, Family, LatentFormat, Release

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
    },
    counts={"double_blocks": r"transformer_blocks\.(\d+)\.",
            "single_blocks": r"single_transformer_blocks\.(\d+)\."},
    flags={"guidance": "time_guidance_embed.guidance_embedder."},
)

_PLAIN = {"in_channels": ("out_channels", 1)}
_IO = {"in_channels": 128, "out_channels": 128}
_DEV = dict(_IO, hidden=6144, context=15360, double_blocks=8, single_blocks=48)
_KLEIN_4B = dict(_IO, hidden=3072, context=7680, double_blocks=5, single_blocks=20)
_KLEIN_9B = dict(_IO, hidden=4096, context=12288, double_blocks=8, single_blocks=24)

FLUX2 = Family(
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
