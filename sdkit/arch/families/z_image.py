"""Z-Image (Tongyi-MAI): a single-stream DiT (S3-DiT) of 30 blocks behind two refiners,
Qwen3-4B hidden states as text context, the FLUX.1 VAE; flow matching.

How its files are kept:
- the original / ComfyUI names (`layers.N.attention.qkv`, `attention.out`, `q_norm`,
  `k_norm`, `x_embedder`, `final_layer`, `noise_refiner`, `context_refiner`, `t_embedder`,
  `cap_embedder`, `x_pad_token`, `cap_pad_token`), sometimes under `model.diffusion_model.`;
- diffusers names (`all_x_embedder.2-1`, `all_final_layer.2-1`, `attention.to_q/k/v`,
  `attention.to_out.0`, `norm_q`, `norm_k`), diffusers `ZImageTransformer2DModel`.
The one block key that tells it from Lumina 2's design, which shares the original names,
is the modulation: `layers.N.adaLN_modulation.0` (a bare Linear from the 256-wide time
embedding) where Lumina 2 has `adaLN_modulation.1` (diffusers `infer_diffusers_model_type`
checks `layers.0.adaLN_modulation.0.weight` for z-image before `cap_embedder` for lumina2;
ComfyUI `model_detection.py` reads both as its Lumina 2 model and tells Z-Image by width
3840).

Facts: sizes from the config of Tongyi-MAI/Z-Image-Turbo (dim 3840, 30 layers, 2 refiner
layers, 30 heads, cap_feat_dim 2560 = Qwen3-4B's hidden size, in_channels 16 in 2x2
patches), which the base model Tongyi-MAI/Z-Image shares: Turbo is its distilled version
with the same keys and shapes, so only metadata names either. Latent: the FLUX.1 VAE,
`(x - 0.1159) * 0.3611` (ComfyUI `supported_models.py` ZImage uses `latent_formats.Flux`).
ModelSpec `Z-Image` (musubi-tuner `sai_model_spec.py` ARCH_Z_IMAGE, for both releases);
Civitai base models "ZImageTurbo" and "ZImageBase", ecosystems ZImageTurbo and ZImageBase
(civitai `basemodel.constants.ts`).

Key map (diffusers `convert_z_image_transformer_checkpoint_to_diffusers`; ComfyUI
`comfy/utils.py` `z_image_to_diffusers`): the embedders of the one released patch size
gain diffusers' `all_x_embedder.2-1` / `all_final_layer.2-1` names, `attention.qkv` holds
q, k and v in equal thirds (diffusers' class gives every head a key and a value, whatever
`n_kv_heads` says), `attention.out` and the query/key norms are renamed, and every other
tensor (time and caption embedders, pad tokens, feed-forward, the four block norms, the
block modulation) keeps its name.
"""

from __future__ import annotations

from sdkit.arch.families.encoders import QWEN3_4B
from sdkit.arch.families.spec import (
    BlockMap,
    DenoiserLayout,
    DiffusersModel,
    Family,
    KeyMap,
    LatentFormat,
    Place,
    Release,
    SamplingPipeline,
    fused,
    kept,
    same,
    tensor,
)

FLUX_VAE_LATENT = LatentFormat(channels=16, scaling_factor=0.3611, shift_factor=0.1159)
_TIME_FEATURES = 256
_TIME_HIDDEN = 1024  # the time embedder's inner width is fixed, whatever the model's width

_COUNTS = {"layers": r"layers\.(\d+)\.", "refiner_layers": r"noise_refiner\.(\d+)\."}

ORIGINAL_LAYOUT = DenoiserLayout(
    convention="ldm",
    markers=("layers.0.adaLN_modulation.0.", "x_pad_token", "cap_pad_token"),
    shapes={
        "x_embedder.weight": ("hidden", "in_channels"),
        "cap_embedder.1.weight": ("hidden", "context"),
        "t_embedder.mlp.0.weight": (_TIME_HIDDEN, _TIME_FEATURES),
        "t_embedder.mlp.2.weight": ("adaln", _TIME_HIDDEN),
        "layers.0.adaLN_modulation.0.weight": ("4*hidden", "adaln"),
        "layers.0.attention.qkv.weight": ("3*hidden", "hidden"),
    },
    optional_shapes={"final_layer.linear.weight": ("out_channels", "hidden"),
                     "layers.0.attention.q_norm.weight": ("head",)},
    counts=_COUNTS,
)

DIFFUSERS_LAYOUT = DenoiserLayout(
    convention="diffusers",
    markers=("all_x_embedder.",),
    shapes={
        "all_x_embedder.2-1.weight": ("hidden", "in_channels"),
        "cap_embedder.1.weight": ("hidden", "context"),
        "t_embedder.mlp.0.weight": (_TIME_HIDDEN, _TIME_FEATURES),
        "t_embedder.mlp.2.weight": ("adaln", _TIME_HIDDEN),
        "layers.0.adaLN_modulation.0.weight": ("4*hidden", "adaln"),
        "layers.0.attention.to_q.weight": ("hidden", "hidden"),
    },
    optional_shapes={"all_final_layer.2-1.linear.weight": ("out_channels", "hidden"),
                     "layers.0.attention.norm_q.weight": ("head",)},
    counts=_COUNTS,
)

# one design for the noise refiner, the context refiner (which has no modulation: its
# `adaLN_modulation` place is simply absent) and the main blocks
_BLOCK: tuple[Place, ...] = (
    fused("attention.qkv", "attention.to_q", "attention.to_k", "attention.to_v"),
    same("attention.out", "attention.to_out.0"),
    tensor("attention.q_norm.weight", "attention.norm_q.weight"),
    tensor("attention.k_norm.weight", "attention.norm_k.weight"),
    *kept("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention_norm1", "ffn_norm1",
          "attention_norm2", "ffn_norm2", "adaLN_modulation.0"),
)

KEY_MAP = KeyMap(
    places=(
        same("x_embedder", "all_x_embedder.2-1"), same("final_layer.linear", "all_final_layer.2-1.linear"),
        same("final_layer.adaLN_modulation.1", "all_final_layer.2-1.adaLN_modulation.1"),
        *kept("x_pad_token", "cap_pad_token", params=()),
        *kept("t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.0", "cap_embedder.1"),
    ),
    blocks=(
        BlockMap("refiner_layers", "noise_refiner.{i}.", "noise_refiner.{i}.", _BLOCK),
        BlockMap("refiner_layers", "context_refiner.{i}.", "context_refiner.{i}.", _BLOCK),
        BlockMap("layers", "layers.{i}.", "layers.{i}.", _BLOCK),
    ),
)

# Tongyi-MAI/Z-Image-Turbo transformer/config.json (Tongyi-MAI/Z-Image has the same). The
# layout's channels are those of 2 x 2 patches; the rotary axes split the head width, so
# only a model of the released head width can reuse them
DIFFUSERS_MODEL = DiffusersModel(
    "ZImageTransformer2DModel",
    config={"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
            "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
            "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
            "axes_lens": [1024, 512, 512]},
    measured={"in_channels": "in_channels/4", "dim": "hidden", "n_layers": "layers",
              "n_refiner_layers": "refiner_layers", "n_heads": "hidden/head", "cap_feat_dim": "context"},
    unmeasured=("axes_dims",),
)

# ZImagePipeline: the Qwen3 encoder's second-to-last hidden states of the chat-formatted
# prompt, CFG as `pos + g * (pos - neg)`; Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json
SAMPLING = SamplingPipeline("ZImagePipeline", {"text_encoder": "Qwen3Model"},
                            schedule={"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},
                            guidance="cfg-1", img2img_class="ZImageImg2ImgPipeline")

_RELEASED = {"hidden": 3840, "context": 2560, "in_channels": 64, "out_channels": 64, "adaln": 256,
             "layers": 30, "refiner_layers": 2}
_SAME_IN_OUT = {"in_channels": ("out_channels", 1)}

Z_IMAGE = Family(
    implementation="https://github.com/Tongyi-MAI/Z-Image",
    name="z-image", title="Z-Image", denoiser="dit", context_dim=2560, unet_channels=3840,
    adm_channels=None, unet_levels=None, in_channels=64, latent=FLUX_VAE_LATENT,
    default_resolution=1024, modelspec_architecture="Z-Image", kohya_base_model_version=None,
    text_encoders=(QWEN3_4B,), vae_part="FLUX VAE", prediction="flow",
    modelspec_prefixes=("z-image",), civitai_base_models=("ZImageTurbo", "ZImageBase"),
    air_ecosystem="zimageturbo", layouts=(ORIGINAL_LAYOUT, DIFFUSERS_LAYOUT),
    diffusers_pipeline_pattern=r"ZImage\w*Pipeline", key_map=KEY_MAP, diffusers_model=DIFFUSERS_MODEL,
    sampling=SAMPLING,
    # fp8: embedders, the final layer and every block's adaLN modulation stay in 16 bits
    # (convert_to_quant's Z-Image list, the community fp8 converter)
    gguf_architecture="lumina2",  # what ComfyUI-GGUF's convert.py detects
    fp8_keep=(r"(x_embedder|cap_embedder|t_embedder|final_layer)\.",
              r"(layers|noise_refiner|context_refiner)\.\d+\.adaLN_modulation\.",),
    releases=(
        # the shared design: what a file without naming metadata is
        Release("Z-Image", dims=_RELEASED, ratios=_SAME_IN_OUT, modelspec_architecture="Z-Image",
                civitai_base_models=("ZImageTurbo", "ZImageBase")),
        Release("Z-Image-Turbo", dims=_RELEASED, ratios=_SAME_IN_OUT, named_by=("turbo",),
                civitai_base_models=("ZImageTurbo",), air_ecosystem="zimageturbo"),
        Release("Z-Image-Base", dims=_RELEASED, ratios=_SAME_IN_OUT, named_by=("base",),
                civitai_base_models=("ZImageBase",), air_ecosystem="zimagebase"),
    ),
)

FAMILIES = (Z_IMAGE,)
