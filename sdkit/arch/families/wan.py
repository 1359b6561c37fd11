"""Wan 2.1 and 2.2 (Wan-AI): a video diffusion transformer of uniform blocks (self-attention,
cross-attention to UMT5-XXL text, MLP, per-block modulation) over the latent of a 3-D causal
VAE; flow matching.

How its files are kept:
- the diffusion model alone, in the original / ComfyUI names (`patch_embedding`,
  `text_embedding.{0,2}`, `time_embedding.{0,2}`, `time_projection.1`,
  `blocks.N.{self_attn,cross_attn}.{q,k,v,o}`, `blocks.N.ffn.{0,2}`, `blocks.N.modulation`,
  `head.head`, `head.modulation`; 2.1 I2V adds `img_emb.proj.*` and
  `cross_attn.{k_img,v_img}`), sometimes under `model.diffusion_model.`; or in diffusers
  names (`condition_embedder.*`, `blocks.N.attn1/attn2.to_*`, `ffn.net.*`,
  `scale_shift_table`, `proj_out`), diffusers `convert_wan_transformer_to_diffusers`;
- the text encoder alone: UMT5-XXL's encoder as transformers keeps it
  (`umt5_xxl_fp8_e4m3fn_scaled.safetensors`); 2.1 I2V also needs the CLIP ViT-H vision
  tower (`clip_vision_h.safetensors`);
- the VAE alone: Wan 2.1's 3-D causal VAE (16 latent channels; 2.1 models and the 2.2
  A14B experts) or Wan 2.2's (48 channels, TI2V-5B only).

Facts: released sizes from the diffusers `transformer/config.json` of
Wan-AI/Wan2.1-T2V-1.3B-Diffusers (12 heads x 128 = 1536, FFN 8960, 30 blocks),
Wan2.1-T2V-14B / Wan2.2-{T2V,I2V}-A14B (40 x 128 = 5120, FFN 13824, 40 blocks),
Wan2.1-I2V-14B-{480P,720P} (in 36, `image_dim` 1280, `added_kv_proj_dim` 5120) and
Wan2.2-TI2V-5B (24 x 128 = 3072, FFN 14336, 30 blocks, in / out 48); text width 4096, time
features 256, patch (1, 2, 2). ComfyUI `model_detection.py` (`head.modulation` marks Wan;
`img_emb.proj.0.bias` I2V, `vace_patch_embedding` VACE, `control_adapter.conv` camera,
`casual_audio_encoder` S2V, `audio_proj` HuMo, `face_adapter` Animate, `img_emb.emb_pos`
first-last-frame) and `supported_models.py` (WAN21_T2V / WAN21_I2V / WAN22_T2V: out_dim 48
takes the Wan 2.2 latent). The 480P and 720P I2V models share every shape, as do the 2.2
A14B high- and low-noise experts, which also share 2.1 14B's (T2V) or lack its image
embedding (I2V). Latents from ComfyUI `latent_formats.py` Wan21 / Wan22 (scale 1, per-channel
mean and std; diffusers AutoencoderKLWan config the same). musubi-tuner writes
`modelspec.architecture` "wan2.1" for every Wan model. Civitai base models and ecosystem
keys from civitai `basemodel.constants.ts` (Wan Video family).

Key map (diffusers `convert_wan_transformer_to_diffusers`): one tensor per place, renamed
only. The embedders move under `condition_embedder` (2.1 I2V's `img_emb.proj` MLP becomes
its `image_embedder`: norm, two linears, norm), `self_attn` / `cross_attn` become `attn1` /
`attn2` with diffusers' projection names (the image key and value `add_k_proj` /
`add_v_proj`), the block's affine cross-attention norm `norm3` is diffusers' `norm2`, and
both modulation tables (`[1, 6, dim]` per block, `[1, 2, dim]` in the head) keep their
shapes as `scale_shift_table`. The heads' width cannot be read from the weights (the
query/key norms span all heads): a release gives it.
"""

from __future__ import annotations

from sdkit.arch.families.encoders import UMT5_XXL
from sdkit.arch.families.spec import (BlockMap, DenoiserLayout, DiffusersModel, Family, KeyMap, LatentFormat, Place, Release,
                                      kept, same, tensor)

_TIME_FEATURES = 256

WAN21_LATENT = LatentFormat(
    channels=16, scaling_factor=1.0, video=True,
    latents_mean=(-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921),
    latents_std=(2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160),
)
WAN22_LATENT = LatentFormat(
    channels=48, scaling_factor=1.0, video=True,
    latents_mean=(-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
                  -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
                  -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
                  -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
                  -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
                  0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667),
    latents_std=(0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
                 0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
                 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
                 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
                 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744),
)

# what the weights show of the Wan relatives no release here is: each is a flag that every
# release below has off, so such a file is "Wan, no release of this design", never T2V-14B
_RELATIVES = {"vace": "vace_blocks.", "camera": "control_adapter.", "speech": "casual_audio_encoder.",
              "humo": "audio_proj.", "animate": "face_adapter."}

ORIGINAL_LAYOUT = DenoiserLayout(
    convention="ldm",
    markers=("head.modulation",),
    shapes={
        "patch_embedding.weight": ("hidden", "in_channels", 1, 2, 2),
        "text_embedding.0.weight": ("hidden", "context"),
        "time_embedding.0.weight": ("hidden", _TIME_FEATURES),
        "time_projection.1.weight": ("6*hidden", "hidden"),
        "blocks.0.self_attn.q.weight": ("hidden", "hidden"),
        "blocks.0.ffn.0.weight": ("ffn", "hidden"),
        "blocks.0.modulation": (1, 6, "hidden"),
        "head.modulation": (1, 2, "hidden"),
        "head.head.weight": ("4*out_channels", "hidden"),
    },
    optional_shapes={"blocks.0.cross_attn.k_img.weight": ("hidden", "hidden")},
    counts={"depth": r"blocks\.(\d+)\."},
    flags={"image_embedding": "img_emb.", "first_last_frame": "img_emb.emb_pos", **_RELATIVES},
)

DIFFUSERS_LAYOUT = DenoiserLayout(
    convention="diffusers",
    markers=("condition_embedder.time_proj.",),
    shapes={
        "patch_embedding.weight": ("hidden", "in_channels", 1, 2, 2),
        "condition_embedder.text_embedder.linear_1.weight": ("hidden", "context"),
        "condition_embedder.time_embedder.linear_1.weight": ("hidden", _TIME_FEATURES),
        "condition_embedder.time_proj.weight": ("6*hidden", "hidden"),
        "blocks.0.attn1.to_q.weight": ("hidden", "hidden"),
        "blocks.0.ffn.net.0.proj.weight": ("ffn", "hidden"),
        "blocks.0.scale_shift_table": (1, 6, "hidden"),
        "scale_shift_table": (1, 2, "hidden"),
        "proj_out.weight": ("4*out_channels", "hidden"),
    },
    optional_shapes={"blocks.0.attn2.add_k_proj.weight": ("hidden", "hidden")},
    counts={"depth": r"blocks\.(\d+)\."},
    flags={"image_embedding": "condition_embedder.image_embedder.",
           "first_last_frame": "condition_embedder.image_embedder.pos_embed", **_RELATIVES},
)

_IMAGE_EMBEDDER = "condition_embedder.image_embedder"


def _attention(ldm: str, diffusers: str) -> tuple[Place, ...]:
    projections = (same(f"{ldm}.{p}", f"{diffusers}.to_{p}") for p in "qkv")
    return (*projections, same(f"{ldm}.o", f"{diffusers}.to_out.0"),
            same(f"{ldm}.norm_q", f"{diffusers}.norm_q"), same(f"{ldm}.norm_k", f"{diffusers}.norm_k"))


KEY_MAP = KeyMap(
    places=(
        *kept("patch_embedding"),
        same("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
        same("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
        same("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
        same("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
        same("time_projection.1", "condition_embedder.time_proj"),
        same("img_emb.proj.0", f"{_IMAGE_EMBEDDER}.norm1"), same("img_emb.proj.1", f"{_IMAGE_EMBEDDER}.ff.net.0.proj"),
        same("img_emb.proj.3", f"{_IMAGE_EMBEDDER}.ff.net.2"), same("img_emb.proj.4", f"{_IMAGE_EMBEDDER}.norm2"),
        same("head.head", "proj_out"), tensor("head.modulation", "scale_shift_table"),
    ),
    blocks=(
        BlockMap("depth", "blocks.{i}.", "blocks.{i}.", (
            *_attention("self_attn", "attn1"), *_attention("cross_attn", "attn2"),
            same("cross_attn.k_img", "attn2.add_k_proj"), same("cross_attn.v_img", "attn2.add_v_proj"),
            same("cross_attn.norm_k_img", "attn2.norm_added_k"),
            same("norm3", "norm2"), same("ffn.0", "ffn.net.0.proj"), same("ffn.2", "ffn.net.2"),
            tensor("modulation", "scale_shift_table"),
        )),
    ),
)

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json; the releases below give what
# differs in theirs. The head count (hence the head width) is not in the weights
DIFFUSERS_MODEL = DiffusersModel(
    "WanTransformer3DModel",
    config={"patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
            "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": 1024},
    measured={"in_channels": "in_channels", "out_channels": "out_channels", "text_dim": "context",
              "ffn_dim": "ffn", "num_layers": "depth"},
    unmeasured=("num_attention_heads", "attention_head_dim"),
)
# Wan-AI/Wan2.1-T2V-14B-Diffusers, Wan2.2-{T2V,I2V}-A14B-Diffusers: 40 heads of 128
_LARGE_CONFIG = {"num_attention_heads": 40}
# Wan-AI/Wan2.1-I2V-14B-{480P,720P}-Diffusers: CLIP-H image features (1280 wide) with their
# own key and value projections in every cross-attention
_CLIP_I2V_CONFIG = {"num_attention_heads": 40, "image_dim": 1280, "added_kv_proj_dim": 5120}

_PLAIN = {name: False for name in ("first_last_frame", *_RELATIVES)}
_TEXT = dict(_PLAIN, image_embedding=False)
_CLIP_IMAGE = dict(_PLAIN, image_embedding=True)
_SAME_IN_OUT = {"in_channels": ("out_channels", 1)}  # text-to-video: latent in, latent out

_SMALL = {"hidden": 1536, "ffn": 8960, "depth": 30, "context": 4096, "in_channels": 16, "out_channels": 16}
_LARGE = {"hidden": 5120, "ffn": 13824, "depth": 40, "context": 4096, "in_channels": 16, "out_channels": 16}
_LARGE_I2V = dict(_LARGE, in_channels=36)  # noise 16 + mask 4 + image latent 16
_TI2V = {"hidden": 3072, "ffn": 14336, "depth": 30, "context": 4096, "in_channels": 48, "out_channels": 48}
_CLIP_H = "CLIP-H vision"

WAN = Family(
    implementation="https://github.com/Wan-Video/Wan2.1",
    name="wan", title="Wan", denoiser="wan", context_dim=4096, unet_channels=5120,
    # 832: the long side of Wan's 480p frame (832 x 480); 720p releases use 1280 x 720
    adm_channels=None, unet_levels=None, in_channels=16, latent=WAN21_LATENT, default_resolution=832,
    modelspec_architecture="wan2.1", kohya_base_model_version=None, text_encoders=(UMT5_XXL,),
    vae_part="Wan 2.1 VAE", prediction="flow", other_unet_channels=(1536, 3072),
    modelspec_prefixes=("wan2", "wan-2"), civitai_base_models=(
        "Wan Video 1.3B t2v", "Wan Video 14B t2v", "Wan Video 14B i2v 480p", "Wan Video 14B i2v 720p",
        "Wan Video 2.2 TI2V-5B", "Wan Video 2.2 I2V-A14B", "Wan Video 2.2 T2V-A14B"),
    diffusers_pipeline_pattern=r"Wan\w*Pipeline", air_ecosystem="wanvideo", layouts=(ORIGINAL_LAYOUT, DIFFUSERS_LAYOUT),
    key_map=KEY_MAP, diffusers_model=DIFFUSERS_MODEL,
    # fp8: the text, time and image embedders and the head stay in 16 bits
    # (convert_to_quant's Wan lists)
    gguf_architecture="wan",  # what ComfyUI-GGUF's convert.py detects
    fp8_keep=(r"(text_embedding|time_embedding|time_projection|img_emb|head\.head)\.",),
    releases=(
        Release("Wan2.1-T2V-1.3B", dims=_SMALL, flags=_TEXT, ratios=_SAME_IN_OUT,
                civitai_base_models=("Wan Video 1.3B t2v",), air_ecosystem="wanvideo1_3b_t2v"),
        Release("Wan2.1-T2V-14B", dims=_LARGE, flags=_TEXT, ratios=_SAME_IN_OUT, config=_LARGE_CONFIG,
                civitai_base_models=("Wan Video 14B t2v",), air_ecosystem="wanvideo14b_t2v"),
        Release("Wan2.1-I2V-14B-480P", dims=_LARGE_I2V, flags=_CLIP_IMAGE, variant="i2v",
                image_encoder=_CLIP_H, config=_CLIP_I2V_CONFIG, civitai_base_models=("Wan Video 14B i2v 480p",),
                air_ecosystem="wanvideo14b_i2v_480p"),
        Release("Wan2.1-I2V-14B-720P", dims=_LARGE_I2V, flags=_CLIP_IMAGE, variant="i2v",
                named_by=("720p",), image_encoder=_CLIP_H, config=_CLIP_I2V_CONFIG,
                civitai_base_models=("Wan Video 14B i2v 720p",), air_ecosystem="wanvideo14b_i2v_720p"),
        Release("Wan2.2-TI2V-5B", dims=_TI2V, flags=_TEXT, ratios=_SAME_IN_OUT, latent=WAN22_LATENT,
                vae_part="Wan 2.2 VAE", civitai_base_models=("Wan Video 2.2 TI2V-5B",),
                # Wan-AI/Wan2.2-TI2V-5B-Diffusers: 24 heads of 128
                config={"num_attention_heads": 24},
                air_ecosystem="wanvideo-22-ti2v-5b"),
        Release("Wan2.2-T2V-A14B", dims=_LARGE, flags=_TEXT, ratios=_SAME_IN_OUT,
                named_by=("2.2", "a14b"), config=_LARGE_CONFIG, civitai_base_models=("Wan Video 2.2 T2V-A14B",),
                air_ecosystem="wanvideo-22-t2v-a14b"),
        Release("Wan2.2-I2V-A14B", dims=_LARGE_I2V, flags=_TEXT, variant="i2v", config=_LARGE_CONFIG,
                civitai_base_models=("Wan Video 2.2 I2V-A14B",), air_ecosystem="wanvideo-22-i2v-a14b"),
    ),
)

FAMILIES = (WAN,)
