"""Chroma (lodestones): a FLUX.1-schnell-derived transformer whose blocks carry no
modulation of their own. FLUX.1's per-block `img_mod` / `txt_mod` / `modulation` layers, its
`time_in`, `vector_in`, `guidance_in` and the final layer's `adaLN_modulation` are gone; one
small MLP, the `distilled_guidance_layer` approximator, computes every block's modulation
from the timestep and guidance. T5-XXL only (no CLIP); FLUX.1's 16-channel VAE; flow matching.

Chroma Radiance is the pixel-space sibling: the same backbone reading 16 x 16 RGB patches
through a conv (`img_in_patch`) and writing pixels through a NeRF-style head
(`nerf_image_embedder`, `nerf_blocks.N.param_generator`, `nerf_final_layer_conv` or the
older `nerf_final_layer`); an x0-predicting file carries an empty `__x0__` buffer. It needs
no VAE.

How Chroma files are kept: the diffusion model alone in BFL / ComfyUI names
(`img_in`, `txt_in`, `distilled_guidance_layer.{in_proj,layers.N.{in_layer,out_layer},
norms.N.scale,out_proj}`, `double_blocks.N.*`, `single_blocks.N.*`, `final_layer.linear`),
sometimes under `model.diffusion_model.`; or in diffusers names (`x_embedder`,
`context_embedder`, `distilled_guidance_layer.layers.N.linear_1`, `transformer_blocks.N.*`,
`single_transformer_blocks.N.*`, `proj_out`).

Facts: sizes from the diffusers config of lodestones/Chroma1-HD (`ChromaTransformer2DModel`:
hidden 24 x 128 = 3072, 19 double + 38 single blocks, joint 4096, in 64, approximator 64 ->
5120 x 5 layers -> 3072) and diffusers' `convert_chroma_transformer_checkpoint_to_diffusers`
(the BFL names above; the approximator is `distilled_guidance_layer` in both conventions);
ComfyUI `model_detection.py` tells Chroma by `distilled_guidance_layer` and Radiance by its
missing `img_in` (`img_in_patch` instead); Radiance's head from ComfyUI
`ldm/chroma_radiance` (`NerfEmbedder`, `NerfGLUBlock`, `NerfFinalLayerConv`, patch 16).
Chroma1-HD, Chroma1-Base and Chroma1-Flash share every key and shape: only metadata names
them. Diffusers has no class or converter for Radiance (0.42), so it has no key map. ModelSpec `chroma` (sd-scripts `ARCH_FLUX_1_CHROMA`); Civitai base model "Chroma" in
ecosystem Chroma (civitai `basemodel.constants.ts`). A Chroma file has neither `vector_in`
nor `img_mod`, so it is never taken for FLUX.1.
"""

from __future__ import annotations

from sdkit.arch.families.encoders import T5_XXL, with_component
from sdkit.arch.families.flux import FLUX
from sdkit.arch.families.spec import (
    BlockMap,
    DenoiserLayout,
    DiffusersModel,
    Family,
    KeyMap,
    LatentFormat,
    Release,
    SamplingPipeline,
    same,
    tensor,
)

# the approximator: timestep + guidance features and a modulation index in, one modulation
# vector per block out (in_proj [width, 64], `layers` x MLP, out_proj [hidden, width])
_APPROXIMATOR = {
    "distilled_guidance_layer.in_proj.weight": ("approximator_width", "approximator_in"),
    "distilled_guidance_layer.out_proj.weight": ("hidden", "approximator_width"),
}
_APPROXIMATOR_LAYERS = r"distilled_guidance_layer\.layers\.(\d+)\."
_BFL_BLOCKS = {"double_blocks": r"double_blocks\.(\d+)\.", "single_blocks": r"single_blocks\.(\d+)\."}

BFL_LAYOUT = DenoiserLayout(
    convention="ldm",
    markers=("distilled_guidance_layer.",),
    shapes={
        "img_in.weight": ("hidden", "in_channels"),
        "txt_in.weight": ("hidden", "context"),
        **_APPROXIMATOR,
        "double_blocks.0.img_attn.qkv.weight": ("3*hidden", "hidden"),
    },
    optional_shapes={"final_layer.linear.weight": ("out_channels", "hidden"),
                     "double_blocks.0.img_attn.norm.query_norm.scale": ("head",)},
    counts={**_BFL_BLOCKS, "approximator_layers": _APPROXIMATOR_LAYERS},
)

DIFFUSERS_LAYOUT = DenoiserLayout(
    convention="diffusers",
    markers=("distilled_guidance_layer.",),
    shapes={
        "x_embedder.weight": ("hidden", "in_channels"),
        "context_embedder.weight": ("hidden", "context"),
        **_APPROXIMATOR,
        "transformer_blocks.0.attn.to_q.weight": ("hidden", "hidden"),
    },
    optional_shapes={"proj_out.weight": ("out_channels", "hidden"),
                     "transformer_blocks.0.attn.norm_q.weight": ("head",)},
    counts={"double_blocks": r"transformer_blocks\.(\d+)\.",
            "single_blocks": r"single_transformer_blocks\.(\d+)\.",
            "approximator_layers": _APPROXIMATOR_LAYERS},
)

RADIANCE_LAYOUT = DenoiserLayout(
    convention="ldm",
    markers=("img_in_patch.", "nerf_blocks."),
    shapes={
        "img_in_patch.weight": ("hidden", "in_channels", "patch", "patch"),
        "txt_in.weight": ("hidden", "context"),
        **_APPROXIMATOR,
        "double_blocks.0.img_attn.qkv.weight": ("3*hidden", "hidden"),
        "nerf_image_embedder.embedder.0.weight": ("nerf_width", None),
        "nerf_blocks.0.param_generator.weight": (None, "hidden"),
    },
    counts={**_BFL_BLOCKS, "approximator_layers": _APPROXIMATOR_LAYERS,
            "nerf_blocks": r"nerf_blocks\.(\d+)\."},
    flags={"x0": "__x0__", "conv_head": "nerf_final_layer_conv."},
)


def _unmodulated(block: BlockMap, modulations: tuple[str, ...]) -> BlockMap:
    """A FLUX.1 block list without the blocks' own modulation layers."""
    places = tuple(place for place in block.places if place.ldm not in modulations)
    return BlockMap(block.count, block.ldm, block.diffusers, places)


_DOUBLE, _SINGLE = FLUX.key_map.blocks
# BFL names ⇄ diffusers names (diffusers `convert_chroma_transformer_checkpoint_to_diffusers`):
# FLUX.1's blocks less their modulation; the approximator keeps its name, its MLP layers and
# RMS norms renamed as diffusers' embedders and norms name them
KEY_MAP = KeyMap(
    places=(
        same("img_in", "x_embedder"), same("txt_in", "context_embedder"),
        same("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj"),
        same("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj"),
        same("final_layer.linear", "proj_out"),
    ),
    blocks=(
        BlockMap("approximator_layers", "distilled_guidance_layer.layers.{i}.", "distilled_guidance_layer.layers.{i}.",
                 (same("in_layer", "linear_1"), same("out_layer", "linear_2"))),
        BlockMap("approximator_layers", "distilled_guidance_layer.norms.{i}.", "distilled_guidance_layer.norms.{i}.",
                 (tensor("scale", "weight"),)),
        _unmodulated(_DOUBLE, ("img_mod.lin", "txt_mod.lin")),
        _unmodulated(_SINGLE, ("modulation.lin",)),
    ),
)

# lodestones/Chroma1-HD transformer/config.json; the rotary axes split the head width
DIFFUSERS_MODEL = DiffusersModel(
    "ChromaTransformer2DModel",
    config={"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "axes_dims_rope": [16, 56, 56], "approximator_num_channels": 64, "approximator_hidden_dim": 5120,
            "approximator_layers": 5},
    measured={"in_channels": "in_channels", "out_channels": "out_channels", "num_layers": "double_blocks",
              "num_single_layers": "single_blocks", "attention_head_dim": "head",
              "num_attention_heads": "hidden/head", "joint_attention_dim": "context",
              "approximator_num_channels": "approximator_in", "approximator_hidden_dim": "approximator_width",
              "approximator_layers": "approximator_layers"},
    unmeasured=("axes_dims_rope",),
)

_BACKBONE = {"hidden": 3072, "context": 4096, "double_blocks": 19, "single_blocks": 38,
             "approximator_width": 5120, "approximator_in": 64, "approximator_layers": 5}
_LATENT = {"in_channels": 64, "out_channels": 64}
_PLAIN = {"in_channels": ("out_channels", 1)}
_T5 = with_component(T5_XXL, "text_encoder")  # diffusers ChromaPipeline: T5 is `text_encoder`

# ChromaPipeline (T5 with its attention mask, real CFG); lodestones/Chroma1-HD
# scheduler/scheduler_config.json, FLUX.1-dev's resolution-dependent shift
SAMPLING = SamplingPipeline("ChromaPipeline", {"text_encoder": "T5EncoderModel"},
                            schedule=FLUX.sampling.schedule, packed=True,
                            img2img_class="ChromaImg2ImgPipeline")

CHROMA = Family(
    implementation="https://huggingface.co/lodestones/Chroma",
    name="chroma", title="Chroma", denoiser="flux", context_dim=4096, unet_channels=3072,
    adm_channels=None, unet_levels=None, in_channels=64, latent=FLUX.latent,
    default_resolution=1024, modelspec_architecture="chroma", kohya_base_model_version=None,
    kohya_network_module="networks.lora_flux",  # sd-scripts trains Chroma with its FLUX network
    text_encoders=(_T5,), vae_part=FLUX.vae_part, prediction="flow",
    modelspec_prefixes=("chroma",), kohya_version_pattern=r"chroma(?![-_ ]?radiance)",
    civitai_base_models=("Chroma",), air_ecosystem="chroma", diffusers_pipeline_pattern=r"Chroma\w*Pipeline",
    layouts=(BFL_LAYOUT, DIFFUSERS_LAYOUT), key_map=KEY_MAP, diffusers_model=DIFFUSERS_MODEL, sampling=SAMPLING,
    # fp8: the approximator, the embedders and the final layer stay in 16 bits
    # (convert_to_quant's list for Chroma, "distillation_large")
    gguf_architecture="flux",  # what ComfyUI-GGUF's convert.py detects
    fp8_keep=(r"(distilled_guidance_layer|img_in|txt_in|final_layer)\.",),
    releases=(
        Release("Chroma1-HD", dims={**_BACKBONE, **_LATENT}, ratios=_PLAIN,
                civitai_base_models=("Chroma",), air_ecosystem="chroma"),
        Release("Chroma1-Base", dims={**_BACKBONE, **_LATENT}, ratios=_PLAIN, named_by=("base",),
                civitai_base_models=("Chroma",), air_ecosystem="chroma"),
        Release("Chroma1-Flash", dims={**_BACKBONE, **_LATENT}, ratios=_PLAIN, named_by=("flash",),
                civitai_base_models=("Chroma",), air_ecosystem="chroma"),
    ),
)

CHROMA_RADIANCE = Family(
    name="chroma-radiance", title="Chroma Radiance", denoiser="flux", context_dim=4096,
    unet_channels=3072, adm_channels=None, unet_levels=None, in_channels=3,
    latent=LatentFormat(channels=3, scaling_factor=1.0),  # pixels: RGB in [-1, 1]
    default_resolution=1024, modelspec_architecture=None, kohya_base_model_version=None,
    text_encoders=(_T5,), vae_part="", prediction="flow",
    modelspec_prefixes=("chroma_radiance", "chroma-radiance"),
    kohya_version_pattern=r"chroma[-_ ]?radiance",
    layouts=(RADIANCE_LAYOUT,),
    # fp8: the pixel-space head and patch embedder, the approximator and the text input
    # stay in 16 bits (convert_to_quant's Radiance and NeRF lists)
    gguf_architecture="flux",  # what ComfyUI-GGUF's convert.py detects
    fp8_keep=((r"(nerf_blocks|nerf_image_embedder|nerf_final_layer_conv|img_in_patch|distilled_guidance_layer|"
               r"txt_in)\."),),
    releases=(
        Release("Chroma1-Radiance", dims={**_BACKBONE, "in_channels": 3, "patch": 16}),
    ),
)

FAMILIES = (CHROMA, CHROMA_RADIANCE)
