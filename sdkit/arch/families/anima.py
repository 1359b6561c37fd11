"""Anima (CircleStone Labs with Comfy Org): a fine-tune of NVIDIA Cosmos-Predict2-2B, a
MiniTrainDIT of 28 uniform blocks (self-attention, cross-attention, MLP, each modulated
through a low-rank AdaLN), whose text context comes from a 6-block `llm_adapter` that
reads Qwen3-0.6B hidden states with queries embedded from T5 token ids; the Qwen-Image
VAE; flow matching.

How its files are kept:
- the diffusion model alone, keys under `net.` as Cosmos keeps them
  (`net.x_embedder.proj.1`, `net.t_embedder.1.linear_1/2`, `net.t_embedding_norm`,
  `net.blocks.N.{self_attn,cross_attn}.{q,k,v,output}_proj` with `q_norm` / `k_norm`,
  `net.blocks.N.mlp.layer1/2`, `net.blocks.N.adaln_modulation_{self_attn,cross_attn,mlp}.1/2`,
  `net.final_layer.linear`, `net.final_layer.adaln_modulation.1/2`, and the adapter
  `net.llm_adapter.{embed,blocks.N.*,out_proj,norm}`): ComfyUI's
  `diffusion_models/anima-*.safetensors`, and what sd-scripts `library/anima_utils.py`
  `save_anima_model` writes. The same names without `net.` are those ComfyUI holds the
  model under once loaded (`unet_prefix_from_state_dict` lists `net.` as the Cosmos root)
  and those ComfyUI-GGUF's `tools/convert.py` keeps (its `strip_prefix` drops `net.`):
  this module reads both;
- the text encoder alone: Qwen3-0.6B (`qwen_3_06b_base.safetensors`);
- the VAE alone: the Qwen-Image VAE (`qwen_image_vae.safetensors`; sd-scripts
  `docs/anima_train_network.md`: the Wan 2.1 VAE design, its official weights named for
  Qwen-Image).
What tells it from a plain Cosmos-Predict2 file, which has every other key: the
`llm_adapter` (ComfyUI `model_detection.py` requires
`llm_adapter.blocks.0.cross_attn.q_proj.weight` for its Anima model among files with
`blocks.0.mlp.layer1.weight`). ComfyUI's `model_detection.py` and `supported_models.py` were
read in a copy found in the code index (the stored upstream versions predate Anima);
`comfy/ldm/anima/model.py` and `comfy/text_encoders/anima.py` upstream.

Facts, with their sources:
- sizes: sd-scripts `library/anima_utils.py` `load_anima_model` (model_channels 2048,
  28 blocks, 16 heads, crossattn_emb_channels 1024, AdaLN-LoRA width 256, latent 16
  channels in, 16 out, 2 x 2 spatial patches, 1 temporal, a padding-mask channel
  concatenated to the input) and `library/anima_models.py` (module shapes: MLP ratio 4,
  per-head RMS norms on queries and keys, no biases in the DiT; the adapter 1024 wide
  with 16 heads, 6 blocks with self-attention, a 32128-token embedding, biased MLP and
  output projection); the same in ComfyUI `comfy/ldm/anima/model.py` (`LLMAdapter`) and
  the Anima branch of `model_detection.py` (in channels = x_embedder columns / 4 - 1,
  width 2048, 28 blocks, 16 heads, context 1024, AdaLN-LoRA 256).
- text encoder: Qwen3-0.6B (sd-scripts `configs/qwen3_06b/config.json`: hidden 1024, 28
  layers, 16 query / 8 key-value heads of 128, vocabulary 151936), `qwen3_06b` in ComfyUI
  all-in-one files (`comfy/text_encoders/anima.py`). The T5 tokenizer it also uses has no
  weights.
- latent: the Qwen-Image VAE's (sd-scripts `library/qwen_image_autoencoder_kl.py`
  latents_mean / latents_std, equal to Wan 2.1's; sdkit's Qwen-Image family names that VAE).
- prediction: rectified flow (sd-scripts `anima_train_network.py`: target noise - latents,
  `FlowMatchEulerDiscreteScheduler`; `library/anima_train_utils.py` samples with flow
  shift 3 by default).
- ModelSpec: sd-scripts `library/sai_model_spec.py` writes `anima-preview` (ARCH_ANIMA_PREVIEW;
  `anima_train_network.py` passes `anima="preview"` for every model) or `anima-unknown`, and
  implementation `https://huggingface.co/circlestone-labs/Anima` (IMPL_ANIMA); sd-scripts'
  `ss_base_model_version` is "anima" (`load_target_model` returns it as the model version).
- Civitai: base model "Anima", ecosystem Anima (civitai
  `packages/civitai-shared/src/basemodel.constants.ts`).
- default resolution 1024: diffusers `AnimaModularPipeline` (default sample size 128 latent
  pixels times the VAE's 8).
- fp8: what stays in 16 bits follows silveroxides/convert_to_quant `ANIMA_LAYER_KEYNAMES`
  (`net.blocks.0.`, `net.blocks.1.adaln_modulation`, `final_layer`, `llm_adapter`,
  `t_embedder`, `x_embedder`); sd-scripts' own fp8 loading keeps every embedder, norm and
  AdaLN layer, the final layer and the adapter's embedding as well.

What diffusers has: no single-file converter and no class for the whole file. Its Anima
pipeline (`modular_pipelines/anima`) holds the DiT as `CosmosTransformer3DModel` (the names
diffusers `convert_cosmos_transformer_checkpoint_to_diffusers` gives Cosmos-Predict2) and the
adapter as a separate `text_conditioner` component (`AnimaTextConditioner`, the adapter's own
names), so one Anima file is two diffusers models. sdkit's key map names one transformer, so
it gives none here, nor a diffusers layout: a diffusers Anima transformer has exactly the keys
of a Cosmos-Predict2-2B one, and claiming it would misname that model.

Unknown: whether the released files also carry Cosmos' positional buffers
(`pos_embedder.seq`, `dim_spatial_range`, `dim_temporal_range`; sd-scripts loads without
them), so nothing here needs them; the sizes of Anima 3.8B (2026-09), which no source here
gives: such a file matches this design and is reported with non-standard sizes, never as the
2B model; whether the 2B preview and later 2B checkpoints differ in any shape (ComfyUI and
sd-scripts load them all with one fixed config, so they are one release here, and
sd-scripts' metadata names every one "preview"). ComfyUI-GGUF (city96, 2025-12) has no Anima
architecture: its converter detects such a file as its Cosmos-Predict2 class and writes
`cosmos`, so no `gguf_architecture` is claimed.
"""

from __future__ import annotations

from sdkit.arch.families.encoders import QWEN3_06B
from sdkit.arch.families.qwen_image import QWEN_IMAGE_LATENT
from sdkit.arch.families.spec import DenoiserLayout, Family, Release

_ADAPTER = "llm_adapter."


def _layout(root: str) -> DenoiserLayout:
    """The Cosmos names under `root` (`net.` as released, "" as ComfyUI and GGUF keep them)."""
    block, adapter = f"{root}blocks.0.", f"{root}{_ADAPTER}blocks.0."
    return DenoiserLayout(
        convention="ldm",
        markers=(f"{root}{_ADAPTER}blocks.",),
        shapes={
            # latent channels and the padding-mask channel, in 2 x 2 patches
            f"{root}x_embedder.proj.1.weight": ("hidden", "in_channels"),
            f"{root}t_embedder.1.linear_2.weight": ("3*hidden", "hidden"),
            f"{block}self_attn.q_proj.weight": ("hidden", "hidden"),
            f"{block}cross_attn.k_proj.weight": ("hidden", "context"),
            f"{block}mlp.layer1.weight": ("ffn", "hidden"),
            f"{block}adaln_modulation_self_attn.1.weight": ("adaln", "hidden"),
            f"{block}adaln_modulation_self_attn.2.weight": ("3*hidden", "adaln"),
            # the adapter turns the language model's states into the blocks' context
            f"{adapter}cross_attn.q_proj.weight": ("adapter", "adapter"),
            f"{adapter}cross_attn.k_proj.weight": ("adapter", "text"),
            f"{root}{_ADAPTER}out_proj.weight": ("context", "adapter"),
        },
        optional_shapes={f"{root}final_layer.linear.weight": ("out_channels", "hidden"),
                         f"{block}self_attn.q_norm.weight": ("head",)},
        counts={"blocks": rf"{_escaped(root)}blocks\.(\d+)\.",
                "adapter_blocks": rf"{_escaped(root)}llm_adapter\.blocks\.(\d+)\."},
    )


def _escaped(root: str) -> str:
    return root.replace(".", r"\.")


ORIGINAL_LAYOUT = _layout("net.")
COMFYUI_LAYOUT = _layout("")

# sd-scripts `load_anima_model`: 2048 wide in 128-wide heads, 28 blocks, a 1024-wide
# context from a 6-block adapter over Qwen3-0.6B's 1024-wide states
_RELEASED = {"hidden": 2048, "in_channels": 68, "out_channels": 64, "context": 1024, "ffn": 8192, "adaln": 256,
             "adapter": 1024, "text": 1024, "blocks": 28, "adapter_blocks": 6}

ANIMA = Family(
    name="anima", title="Anima", denoiser="dit", context_dim=1024, unet_channels=2048,
    adm_channels=None, unet_levels=None, in_channels=68, latent=QWEN_IMAGE_LATENT,
    default_resolution=1024, modelspec_architecture="anima-preview", kohya_base_model_version="anima",
    text_encoders=(QWEN3_06B,), vae_part="Qwen-Image VAE", prediction="flow",
    modelspec_prefixes=("anima",), kohya_version_pattern=r"anima", civitai_base_models=("Anima",),
    air_ecosystem="anima", layouts=(ORIGINAL_LAYOUT, COMFYUI_LAYOUT),
    implementation="https://huggingface.co/circlestone-labs/Anima",
    # fp8: the first block, the second's modulation, the final layer, the time and patch
    # embedders and the whole adapter stay in 16 bits (convert_to_quant's Anima list)
    fp8_keep=(r"(net\.)?(blocks\.0\.|blocks\.1\.adaln_modulation|final_layer\.|llm_adapter\.|t_embedder\.|"
              r"x_embedder\.)",),
    releases=(
        Release("Anima-2B", dims=_RELEASED, modelspec_architecture="anima-preview",
                civitai_base_models=("Anima",), air_ecosystem="anima"),
    ),
)

FAMILIES = (ANIMA,)
