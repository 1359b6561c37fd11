"""Lumina-Image 2.0 (Alpha-VLLM) and its finetunes (Neta Lumina, NetaYume Lumina): a
single-stream DiT of 26 blocks behind two refiners, Gemma-2-2B hidden states as text
context, the FLUX.1 VAE; flow matching.

How its files are kept:
- the original / ComfyUI names (`x_embedder`, `t_embedder.mlp`, `cap_embedder`,
  `noise_refiner`, `context_refiner`, `layers.N.attention.qkv`, `attention.out`,
  `q_norm`, `k_norm`, `feed_forward.w1/w2/w3`, `attention_norm1/2`, `ffn_norm1/2`,
  `adaLN_modulation.1`, `final_layer`, an unused `norm_final`), sometimes under
  `model.diffusion_model.` (diffusers `convert_lumina2_to_diffusers`);
- diffusers names (`time_caption_embed.*`, `layers.N.attn.to_q/k/v`, `norm1.linear`,
  `norm_out.linear_1/2`), diffusers `Lumina2Transformer2DModel`.
Its block modulation is `adaLN_modulation.1` (SiLU then Linear) from a time embedding as
wide as the model (at most 1024); Z-Image, which shares the original names, has
`adaLN_modulation.0` from a 256-wide one.

Facts: sizes from the config of Alpha-VLLM/Lumina-Image-2.0 (hidden 2304, 26 layers, 2
refiner layers, 24 heads with 8 key/value heads, cap_feat_dim 2304 = Gemma-2-2B's hidden
size, in_channels 16 in 2x2 patches; ComfyUI `model_detection.py` reads width 2304 as
"Original Lumina 2"). Neta Lumina and NetaYume Lumina are finetunes with its keys and
shapes: only metadata names them. Latent: FLUX.1 VAE `(x - 0.1159) * 0.3611` (ComfyUI
`supported_models.py` Lumina2 uses `latent_formats.Flux`). ModelSpec `lumina-2`
(sd-scripts `sai_model_spec.py` ARCH_LUMINA_2; `lumina` for others); Civitai base model
"Lumina", ecosystem Lumina (civitai `basemodel.constants.ts`).

Key map (diffusers `convert_lumina2_to_diffusers`): `attention.qkv` stacks the query (as
wide as the model) over the key and the value of the fewer key/value heads, so it is cut
at sizes the file shows (the query norm gives the head width, the fused rows the key/value
width); the time and caption embedders move under `time_caption_embed`, the final layer
becomes `norm_out.linear_1` / `linear_2`, the first attention norm of a modulated block
becomes `norm1.norm` beside its modulation `norm1.linear` (plain `norm1` in the context
refiner). The original model builds a `norm_final` it never applies; diffusers drops it,
and the way back makes it again as ones, an RMSNorm's initial weight.
"""

from __future__ import annotations

from sdkit.arch.families.encoders import GEMMA2_2B
from sdkit.arch.families.spec import (
    BlockMap,
    DenoiserLayout,
    DiffusersModel,
    Family,
    KeyMap,
    Place,
    Release,
    SamplingPipeline,
    fused,
    kept,
    same,
    tensor,
    unused,
)
from sdkit.arch.families.z_image import FLUX_VAE_LATENT

_TIME_FEATURES = 256
_COUNTS = {"layers": r"layers\.(\d+)\.", "refiner_layers": r"noise_refiner\.(\d+)\."}

ORIGINAL_LAYOUT = DenoiserLayout(
    convention="ldm",
    markers=("layers.0.adaLN_modulation.1.",),
    shapes={
        "x_embedder.weight": ("hidden", "in_channels"),
        "cap_embedder.1.weight": ("hidden", "context"),
        "t_embedder.mlp.0.weight": ("adaln", _TIME_FEATURES),
        "layers.0.adaLN_modulation.1.weight": ("4*hidden", "adaln"),
        "layers.0.attention.qkv.weight": ("hidden+2*kv", "hidden"),  # query plus fewer key/value heads
    },
    optional_shapes={"final_layer.linear.weight": ("out_channels", "hidden"),
                     "layers.0.attention.q_norm.weight": ("head",)},
    counts=_COUNTS,
)

DIFFUSERS_LAYOUT = DenoiserLayout(
    convention="diffusers",
    markers=("time_caption_embed.",),
    shapes={
        "x_embedder.weight": ("hidden", "in_channels"),
        "time_caption_embed.caption_embedder.1.weight": ("hidden", "context"),
        "time_caption_embed.timestep_embedder.linear_1.weight": ("adaln", _TIME_FEATURES),
        "layers.0.norm1.linear.weight": ("4*hidden", "adaln"),
        "layers.0.attn.to_q.weight": ("hidden", "hidden"),
        "layers.0.attn.to_k.weight": ("kv", "hidden"),
    },
    optional_shapes={"norm_out.linear_2.weight": ("out_channels", "hidden"),
                     "layers.0.attn.norm_q.weight": ("head",)},
    counts=_COUNTS,
)

_ATTENTION: tuple[Place, ...] = (
    fused("attention.qkv", "attn.to_q", "attn.to_k", "attn.to_v", sizes=("hidden", "kv", "kv")),
    same("attention.out", "attn.to_out.0"),
    tensor("attention.q_norm.weight", "attn.norm_q.weight"),
    tensor("attention.k_norm.weight", "attn.norm_k.weight"),
    same("feed_forward.w1", "feed_forward.linear_1"), same("feed_forward.w2", "feed_forward.linear_2"),
    same("feed_forward.w3", "feed_forward.linear_3"),
    *kept("ffn_norm1", "ffn_norm2"),
)
_MODULATED = (*_ATTENTION, same("attention_norm1", "norm1.norm"), same("adaLN_modulation.1", "norm1.linear"),
              same("attention_norm2", "norm2"))
_CONTEXT = (*_ATTENTION, same("attention_norm1", "norm1"), same("attention_norm2", "norm2"))
_CAPTION = "time_caption_embed.caption_embedder"

KEY_MAP = KeyMap(
    places=(
        same("x_embedder", "x_embedder"),
        same("t_embedder.mlp.0", "time_caption_embed.timestep_embedder.linear_1"),
        same("t_embedder.mlp.2", "time_caption_embed.timestep_embedder.linear_2"),
        same("cap_embedder.0", f"{_CAPTION}.0"), same("cap_embedder.1", f"{_CAPTION}.1"),
        same("final_layer.adaLN_modulation.1", "norm_out.linear_1"), same("final_layer.linear", "norm_out.linear_2"),
        # dtype from the caption RMSNorm's weight, a tensor of the same kind
        unused("norm_final", like=f"{_CAPTION}.0", sizes=("hidden",), fill=1.0),
    ),
    blocks=(
        BlockMap("refiner_layers", "noise_refiner.{i}.", "noise_refiner.{i}.", _MODULATED),
        BlockMap("refiner_layers", "context_refiner.{i}.", "context_refiner.{i}.", _CONTEXT),
        BlockMap("layers", "layers.{i}.", "layers.{i}.", _MODULATED),
    ),
)

# Alpha-VLLM/Lumina-Image-2.0 transformer/config.json. The layout's channels are those of
# 2 x 2 patches; the rotary axes split the head width, and `multiple_of` with
# `ffn_dim_multiplier` set the feed-forward width, so only a model of the released sizes
# can reuse them
DIFFUSERS_MODEL = DiffusersModel(
    "Lumina2Transformer2DModel",
    config={"sample_size": 128, "patch_size": 2, "in_channels": 16, "hidden_size": 2304, "num_layers": 26,
            "num_refiner_layers": 2, "num_attention_heads": 24, "num_kv_heads": 8, "multiple_of": 256,
            "ffn_dim_multiplier": None, "norm_eps": 1e-5, "scaling_factor": 1.0, "axes_dim_rope": [32, 32, 32],
            "axes_lens": [300, 512, 512], "cap_feat_dim": 2304},
    measured={"in_channels": "in_channels/4", "out_channels": "out_channels/4", "hidden_size": "hidden",
              "num_layers": "layers", "num_refiner_layers": "refiner_layers", "num_attention_heads": "hidden/head",
              "num_kv_heads": "kv/head", "cap_feat_dim": "context"},
    unmeasured=("axes_dim_rope", "multiple_of", "ffn_dim_multiplier"),
)

# Lumina2Pipeline: Gemma 2's second-to-last hidden states of the system prompt and the
# prompt, CFG with its norm rescaled (`cfg_normalization`); a shift of 6 without the
# resolution-dependent one (ComfyUI `supported_models.py` Lumina2 `sampling_settings`)
SAMPLING = SamplingPipeline("Lumina2Pipeline", {"text_encoder": "Gemma2Model"},
                            schedule={"num_train_timesteps": 1000, "shift": 6.0, "use_dynamic_shifting": False},
                            max_sequence_length=256)

_RELEASED = {"hidden": 2304, "context": 2304, "in_channels": 64, "out_channels": 64, "adaln": 1024,
             "layers": 26, "refiner_layers": 2}
_SAME_IN_OUT = {"in_channels": ("out_channels", 1)}

LUMINA2 = Family(
    implementation="https://github.com/Alpha-VLLM/Lumina-Image-2.0",
    name="lumina2", title="Lumina-Image 2.0", denoiser="dit", context_dim=2304, unet_channels=2304,
    adm_channels=None, unet_levels=None, in_channels=64, latent=FLUX_VAE_LATENT,
    default_resolution=1024, modelspec_architecture="lumina-2", kohya_base_model_version=None,
    kohya_network_module="networks.lora_lumina",
    text_encoders=(GEMMA2_2B,), vae_part="FLUX VAE", prediction="flow",
    modelspec_prefixes=("lumina",), civitai_base_models=("Lumina",), air_ecosystem="lumina",
    diffusers_pipeline_pattern=r"Lumina2\w*Pipeline",
    layouts=(ORIGINAL_LAYOUT, DIFFUSERS_LAYOUT), key_map=KEY_MAP, diffusers_model=DIFFUSERS_MODEL,
    sampling=SAMPLING,
    # fp8: embedders and the final layer stay in 16 bits (sdkit's rule, as for Z-Image's
    # design without its per-block modulation list: no peer publishes a Lumina 2 list)
    gguf_architecture="lumina2",  # what ComfyUI-GGUF's convert.py detects
    fp8_keep=(r"(x_embedder|cap_embedder|t_embedder|final_layer)\.",),
    releases=(
        Release("Lumina-Image-2.0", dims=_RELEASED, ratios=_SAME_IN_OUT, modelspec_architecture="lumina-2",
                civitai_base_models=("Lumina",), air_ecosystem="lumina"),
        # "netayume" before "neta": the longer name holds the shorter
        Release("NetaYume Lumina", dims=_RELEASED, ratios=_SAME_IN_OUT, named_by=("netayume",),
                civitai_base_models=("Lumina",), air_ecosystem="lumina"),
        Release("Neta Lumina", dims=_RELEASED, ratios=_SAME_IN_OUT, named_by=("neta",),
                civitai_base_models=("Lumina",), air_ecosystem="lumina"),
    ),
)

FAMILIES = (LUMINA2,)
