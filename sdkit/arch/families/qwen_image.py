"""Qwen-Image (Qwen): an MMDiT of 60 dual-stream blocks, Qwen2.5-VL-7B hidden states as
text context, its own 16-channel VAE (a Wan-2.1-style causal 3-D VAE); flow matching.

How its files are kept: one naming everywhere. The original release is a diffusers model
(`QwenImageTransformer2DModel`: `img_in`, `txt_norm`, `txt_in`, `time_text_embed`,
`transformer_blocks.N.{img,txt}_mod/attn/img_mlp/txt_mlp`, `norm_out`, `proj_out`), and
ComfyUI's split files (Comfy-Org/Qwen-Image_ComfyUI) keep those names, sometimes under
`model.diffusion_model.` (ComfyUI `model_detection.py` takes `txt_norm.weight` as the mark
of Qwen-Image and reads `img_in` and the `transformer_blocks` count). So its files are all
reported in the diffusers convention, and its key map keeps every name; diffusers has no
single-file converter for it.

Facts: sizes from the config of Qwen/Qwen-Image (24 heads x 128 = 3072, 60 layers,
joint_attention_dim 3584 = Qwen2.5-VL-7B's hidden size, in 64 = 16 channels in 2x2
patches, out 16 per patch). Qwen-Image-2512 and the edit models Qwen-Image-Edit,
-Edit-2509 and -Edit-2511 share every key and shape with it (2511's `zero_cond_t` adds no
weight), so only metadata names them; Qwen-Image-Layered adds the
`time_text_embed.addition_t_embedding` table (diffusers `use_additional_t_cond`), which
the weights show. Latent: per-channel mean/std, scale 1 (ComfyUI `supported_models.py`
QwenImage uses `latent_formats.Wan21`; the same statistics are in the diffusers VAE config
of Qwen/Qwen-Image); ComfyUI counts it 3-D (`latent_dimensions = 3`). ModelSpec strings
from musubi-tuner `sai_model_spec.py` (`Qwen-Image`, `Qwen-Image-Edit`,
`Qwen-Image-Edit-Plus` for 2509, `Qwen-Image-Edit-2511`); Civitai base model "Qwen",
ecosystem Qwen (civitai `basemodel.constants.ts`; its "Qwen 2" ecosystem is another model).
"""

from __future__ import annotations

from sdkit.arch.families.encoders import QWEN25_VL_7B
from sdkit.arch.families.spec import (
    SAME_NAMES,
    DenoiserLayout,
    DiffusersModel,
    Family,
    Release,
    SamplingPipeline,
)
from sdkit.arch.families.wan import WAN21_LATENT

# the Wan 2.1 VAE's latent space (ComfyUI gives Qwen-Image the Wan21 latent format)
QWEN_IMAGE_LATENT = WAN21_LATENT

DIFFUSERS_LAYOUT = DenoiserLayout(
    convention="diffusers",
    markers=("txt_norm.weight",),
    shapes={
        "img_in.weight": ("hidden", "in_channels"),
        "txt_norm.weight": ("context",),
        "txt_in.weight": ("hidden", "context"),
        "time_text_embed.timestep_embedder.linear_1.weight": ("hidden", 256),
        "transformer_blocks.0.img_mod.1.weight": ("6*hidden", "hidden"),
        "transformer_blocks.0.attn.to_q.weight": ("hidden", "hidden"),
    },
    optional_shapes={"proj_out.weight": ("out_channels", "hidden"),
                     "transformer_blocks.0.attn.norm_q.weight": ("head",)},
    counts={"blocks": r"transformer_blocks\.(\d+)\."},
    flags={"additional_t_cond": "time_text_embed.addition_t_embedding."},
)

# Qwen/Qwen-Image transformer/config.json. The output channels are those of 2 x 2 patches
# (the input's are the packed latent's, as the config counts them); the rotary axes split
# the head width, so only a model of the released head width can reuse them
DIFFUSERS_MODEL = DiffusersModel(
    "QwenImageTransformer2DModel",
    config={"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
            "axes_dims_rope": [16, 56, 56]},
    measured={"in_channels": "in_channels", "out_channels": "out_channels/4", "num_layers": "blocks",
              "attention_head_dim": "head", "num_attention_heads": "hidden/head",
              "joint_attention_dim": "context", "use_additional_t_cond": "flag:additional_t_cond"},
    unmeasured=("axes_dims_rope",),
)

# QwenImagePipeline: Qwen2.5-VL's last hidden states of the prompt in its chat template
# (the template's 34 leading tokens dropped), real CFG as `true_cfg_scale`, the Wan 2.1
# design VAE (`AutoencoderKLQwenImage`); Qwen/Qwen-Image scheduler/scheduler_config.json
SAMPLING = SamplingPipeline(
    "QwenImagePipeline", {"text_encoder": "Qwen2_5_VLForConditionalGeneration"},
    schedule={"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
              "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02,
              "time_shift_type": "exponential"},
    guidance="embedded-or-true", packed=True, vae_class="AutoencoderKLQwenImage",
    img2img_class="QwenImageImg2ImgPipeline")

_RELEASED = {"hidden": 3072, "context": 3584, "in_channels": 64, "out_channels": 64, "blocks": 60}
_SAME_IN_OUT = {"in_channels": ("out_channels", 1)}
_PLAIN = {"additional_t_cond": False}


def _look_alike(name: str, named_by: tuple[str, ...], modelspec: str | None = None, **config) -> Release:
    return Release(name, dims=_RELEASED, flags=_PLAIN, ratios=_SAME_IN_OUT, named_by=named_by,
                   modelspec_architecture=modelspec, civitai_base_models=("Qwen",), air_ecosystem="qwen",
                   config=config)


QWEN_IMAGE = Family(
    name="qwen-image", title="Qwen-Image", denoiser="mmdit", context_dim=3584, unet_channels=3072,
    adm_channels=None, unet_levels=None, in_channels=64, latent=QWEN_IMAGE_LATENT,
    default_resolution=1328, modelspec_architecture="Qwen-Image", kohya_base_model_version=None,
    text_encoders=(QWEN25_VL_7B,), vae_part="Qwen-Image VAE", prediction="flow",
    modelspec_prefixes=("qwen-image",), civitai_base_models=("Qwen",), air_ecosystem="qwen",
    diffusers_pipeline_pattern=r"QwenImage\w*Pipeline",
    layouts=(DIFFUSERS_LAYOUT,), key_map=SAME_NAMES, diffusers_model=DIFFUSERS_MODEL, sampling=SAMPLING,
    # fp8: embedders, the text norm, the output layers and the first block's image
    # modulation stay in 16 bits (convert_to_quant's Qwen-Image list)
    gguf_architecture="qwen_image",  # in ComfyUI-GGUF loader.py IMG_ARCH_LIST
    fp8_keep=(r"(time_text_embed|img_in|txt_in|txt_norm|norm_out|proj_out|transformer_blocks\.0\.img_mod)\.",),
    releases=(
        Release("Qwen-Image", dims=_RELEASED, flags=_PLAIN, ratios=_SAME_IN_OUT,
                modelspec_architecture="Qwen-Image", civitai_base_models=("Qwen",), air_ecosystem="qwen"),
        # Qwen/Qwen-Image-Layered: its rotary positions add a layer axis, which no weight shows
        Release("Qwen-Image-Layered", dims=_RELEASED, flags={"additional_t_cond": True},
                ratios=_SAME_IN_OUT, config={"use_layer3d_rope": True}),
        # the most specific words first: "edit" is in every edit model's name
        # Qwen/Qwen-Image-Edit-2511: a zero timestep for the reference image's tokens
        _look_alike("Qwen-Image-Edit-2511", ("edit-2511",), "Qwen-Image-Edit-2511", zero_cond_t=True),
        _look_alike("Qwen-Image-Edit-2509", ("edit-2509", "edit-plus"), "Qwen-Image-Edit-Plus"),
        _look_alike("Qwen-Image-Edit", ("edit",), "Qwen-Image-Edit"),
        _look_alike("Qwen-Image-2512", ("2512",)),
    ),
)

FAMILIES = (QWEN_IMAGE,)
