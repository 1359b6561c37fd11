"""HiDream-I1 (HiDream.ai): a sparse DiT of 16 dual-stream and 32 single-stream blocks whose
image feed-forwards are mixtures of experts; CLIP-L + CLIP-G (pooled vector), T5-XXL and
Llama-3.1-8B (context, one projection per block); the FLUX.1 VAE; flow matching.

How its files are kept: one naming everywhere. The original implementation and diffusers'
`HiDreamImageTransformer2DModel` share module names (`x_embedder.proj`, `t_embedder`,
`p_embedder`, `double_stream_blocks.N.block.*`, `single_stream_blocks.N.block.*`,
`caption_projection.N`, `final_layer`), and ComfyUI's split files keep them, sometimes
under `model.diffusion_model.` (diffusers `convert_hidream_transformer_to_diffusers` only
drops that prefix; its fingerprint is `double_stream_blocks.0.block.adaLN_modulation.1.bias`).
So its files are all reported in the diffusers convention, and its key map keeps every
name.

Facts: sizes from the configs of HiDream-ai/HiDream-I1-{Full,Dev,Fast} (20 heads x 128 =
2560, 16 + 32 blocks, 4 routed experts of which 2 are active, caption channels 4096 for T5
and Llama, text_emb_dim 2048 = CLIP-L 768 + CLIP-G 1280, in 16 in 2x2 patches). Full, Dev
and Fast share every key and shape (Dev and Fast are distilled from Full): only metadata
names them, so a file without it is reported as the shared design, HiDream-I1. The head
width is not in the weights (the query/key norms span all heads), nor which Llama layer
feeds each block. Latent:
FLUX.1 VAE `(x - 0.1159) * 0.3611` (ComfyUI `supported_models.py` HiDream uses
`latent_formats.Flux`). No trainer's ModelSpec string is known; Civitai base model
"HiDream", ecosystem HiDream (civitai `basemodel.constants.ts`; HiDream-O1 is another model).
"""

from __future__ import annotations

from sdkit.arch.families.encoders import CLIP_G, CLIP_L, LLAMA31_8B, T5_XXL
from sdkit.arch.families.spec import SAME_NAMES, DenoiserLayout, DiffusersModel, Family, Release
from sdkit.arch.families.z_image import FLUX_VAE_LATENT

DIFFUSERS_LAYOUT = DenoiserLayout(
    convention="diffusers",
    markers=("double_stream_blocks.",),
    shapes={
        "x_embedder.proj.weight": ("hidden", "in_channels"),
        "t_embedder.timestep_embedder.linear_1.weight": ("hidden", 256),
        "p_embedder.pooled_embedder.linear_1.weight": ("hidden", "pooled"),
        "caption_projection.0.linear.weight": ("hidden", "context"),
        "double_stream_blocks.0.block.adaLN_modulation.1.weight": ("12*hidden", "hidden"),
        "double_stream_blocks.0.block.ff_i.gate.weight": ("experts", "hidden"),
    },
    optional_shapes={
        "single_stream_blocks.0.block.adaLN_modulation.1.weight": ("6*hidden", "hidden"),
        "final_layer.linear.weight": ("out_channels", "hidden"),
    },
    counts={"double_blocks": r"double_stream_blocks\.(\d+)\.",
            "single_blocks": r"single_stream_blocks\.(\d+)\."},
)

# HiDream-ai/HiDream-I1-Full transformer/config.json (as the conversion script of
# hlky/diffusers `scripts/convert_hidream_to_diffusers.py` writes it): Llama-3.1-8B's 32
# layers feed the 48 blocks, the last one the 16 blocks beyond them. The layout's channels
# are those of 2 x 2 patches
DIFFUSERS_MODEL = DiffusersModel(
    "HiDreamImageTransformer2DModel",
    config={"patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 16, "num_single_layers": 32,
            "attention_head_dim": 128, "num_attention_heads": 20, "caption_channels": [4096, 4096],
            "text_emb_dim": 2048, "num_routed_experts": 4, "num_activated_experts": 2,
            "axes_dims_rope": [64, 32, 32], "max_resolution": [128, 128],
            "llama_layers": [*range(32), *[31] * 16]},
    measured={"in_channels": "in_channels/4", "out_channels": "out_channels/4", "num_layers": "double_blocks",
              "num_single_layers": "single_blocks", "text_emb_dim": "pooled", "num_routed_experts": "experts"},
    unmeasured=("attention_head_dim", "num_attention_heads", "caption_channels", "axes_dims_rope", "llama_layers"),
)

_RELEASED = {"hidden": 2560, "in_channels": 64, "out_channels": 64, "pooled": 2048, "context": 4096,
             "experts": 4, "double_blocks": 16, "single_blocks": 32}
_SAME_IN_OUT = {"in_channels": ("out_channels", 1)}


def _release(name: str, named_by: tuple[str, ...] = ()) -> Release:
    return Release(name, dims=_RELEASED, ratios=_SAME_IN_OUT, named_by=named_by,
                   civitai_base_models=("HiDream",), air_ecosystem="hidream")


HIDREAM = Family(
    name="hidream", title="HiDream-I1", denoiser="dit", context_dim=4096, unet_channels=2560,
    adm_channels=2048, unet_levels=None, in_channels=64, latent=FLUX_VAE_LATENT,
    default_resolution=1024, modelspec_architecture=None, kohya_base_model_version=None,
    text_encoders=(CLIP_L, CLIP_G, T5_XXL, LLAMA31_8B), vae_part="FLUX VAE", prediction="flow",
    civitai_base_models=("HiDream",), air_ecosystem="hidream", layouts=(DIFFUSERS_LAYOUT,),
    diffusers_pipeline_pattern=r"HiDreamImage\w*Pipeline", key_map=SAME_NAMES, diffusers_model=DIFFUSERS_MODEL,
    # fp8: embedders, the caption projections and the final layer stay in 16 bits (sdkit's
    # rule, as for FLUX.1; no peer publishes a HiDream list)
    gguf_architecture="hidream",  # what ComfyUI-GGUF's convert.py detects
    fp8_keep=(r"(x_embedder|t_embedder|p_embedder|caption_projection|final_layer)\.",),
    releases=(
        _release("HiDream-I1"),  # the shared design: what a file without naming metadata is
        _release("HiDream-I1-Full", ("full",)),
        _release("HiDream-I1-Dev", ("dev",)),
        _release("HiDream-I1-Fast", ("fast",)),
    ),
)

FAMILIES = (HIDREAM,)
