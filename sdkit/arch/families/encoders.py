"""The released text encoders that several families share, under the names people use.

A family takes these and sets the diffusers component that holds each in its pipelines
(`with_component`): SD3 keeps T5-XXL in `text_encoder_3`, FLUX.1 in `text_encoder_2`.

Decoder-only language models whose hidden states are the text context are told apart by
their design (Qwen3's per-head q/k norms, Qwen2's q/k/v biases, Gemma 2's four norms a
layer, else the Llama design), hidden width, layer count, attention widths and vocabulary.
Sizes from each model's `config.json` (Qwen/Qwen3-0.6B as sd-scripts bundles it in
`configs/qwen3_06b/config.json`, Qwen/Qwen3-4B, Qwen/Qwen3-8B,
Qwen/Qwen2.5-VL-7B-Instruct, google/gemma-2-2b, meta-llama/Llama-3.1-8B-Instruct,
mistralai/Mistral-Small-3.1-24B-Instruct-2503), the same as ComfyUI's
`comfy/text_encoders/llama.py` configs (Qwen3_4BConfig, Qwen3_8BConfig, Qwen25_7BVLI_Config,
Gemma2_2B_Config, Llama2Config, Mistral3Small24BConfig). ComfyUI `comfy/sd.py`
`detect_te_model` tells them apart the same way: `post_feedforward_layernorm` is Gemma,
a `k_proj.bias` of 512 is Qwen2.5-7B, `q_norm` with width 2560 / 4096 is Qwen3-4B / 8B,
width 5120 with a 40th layer is Mistral 3 Small 24B, else Llama 3 8B. Who else uses them:
FLUX.2 [klein] 4B and 9B run on Qwen3-4B and Qwen3-8B (ComfyUI `text_encoders/flux.py`
klein_te), FLUX.2 [dev] on Mistral-Small-3.1-24B, HunyuanImage-2.1 on Qwen2.5-VL-7B
(ComfyUI `text_encoders/hunyuan_image.py`). The names under `text_encoders.` in ComfyUI's
all-in-one checkpoints (`comfyui_name`) are those its `supported_models.py` `clip_target`s
look for: `clip_l`, `clip_g`, `t5xxl`, `umt5xxl`, `qwen25_7b`, `qwen3_06b` (Anima:
ComfyUI `text_encoders/anima.py` names its Qwen3-0.6B so), `qwen3_4b`, `qwen3_8b`,
`gemma2_2b`, `mistral3_24b`, each followed by `.transformer.` and the encoder's Hugging Face
key names.
"""

from __future__ import annotations

from dataclasses import replace

from sdkit.arch.families.spec import TextEncoderSpec

CLIP_L = TextEncoderSpec("text_encoder", "clip", 768, "CLIP-L", comfyui_name="clip_l")  # openai/clip-vit-large-patch14
CLIP_G = TextEncoderSpec("text_encoder_2", "openclip", 1280, "CLIP-G", comfyui_name="clip_g")  # OpenCLIP ViT-bigG/14
OPENCLIP_H = TextEncoderSpec("text_encoder", "openclip", 1024, "OpenCLIP ViT-H", comfyui_name="clip_h")  # SD 2.x
T5_XXL = TextEncoderSpec("text_encoder_3", "t5", 4096, "T5-XXL", comfyui_name="t5xxl")  # google/t5-v1_1-xxl encoder
CHATGLM3 = TextEncoderSpec("text_encoder", "chatglm", 4096, "ChatGLM3-6B")  # Kolors
UMT5_XXL = TextEncoderSpec("text_encoder", "umt5", 4096, "UMT5-XXL", comfyui_name="umt5xxl")  # google/umt5-xxl encoder (Wan)
# decoder-only language models whose hidden states are the text context
# Anima. Its query heads are wider together (16 x 128) than the model (1024)
QWEN3_06B = TextEncoderSpec("text_encoder", "qwen3", 1024, "Qwen3-0.6B", layers=28, vocab=151936,
                            heads=(16, 8, 128), comfyui_name="qwen3_06b")
QWEN3_4B = TextEncoderSpec("text_encoder", "qwen3", 2560, "Qwen3-4B", layers=36, vocab=151936,
                           heads=(32, 8, 128), comfyui_name="qwen3_4b")  # Z-Image; FLUX.2 [klein] 4B
QWEN3_8B = TextEncoderSpec("text_encoder", "qwen3", 4096, "Qwen3-8B", layers=36, vocab=151936,
                           heads=(32, 8, 128), comfyui_name="qwen3_8b")  # FLUX.2 [klein] 9B
QWEN25_VL_7B = TextEncoderSpec("text_encoder", "qwen2.5-vl", 3584, "Qwen2.5-VL-7B", layers=28,
                               vocab=152064, heads=(28, 4, 128),
                               used_outside=("HunyuanImage-2.1",), comfyui_name="qwen25_7b")  # Qwen-Image
GEMMA2_2B = TextEncoderSpec("text_encoder", "gemma2", 2304, "Gemma-2-2B", layers=26, vocab=256000,
                            heads=(8, 4, 256), comfyui_name="gemma2_2b")  # Lumina 2
# HiDream-I1's fourth encoder; HunyuanVideo's llava-llama-3-8b has 128320 tokens, so is not it
LLAMA31_8B = TextEncoderSpec("text_encoder_4", "llama", 4096, "Llama-3.1-8B", layers=32, vocab=128256,
                             heads=(32, 8, 128))
# FLUX.2-dev: BFL's flux2 `text_encoder.py` pairs 3.1's processor with the 3.2 weights, the
# same architecture (a Llama design)
MISTRAL_SMALL_31 = TextEncoderSpec("text_encoder", "llama", 5120, "Mistral-Small-3.1-24B", layers=40,
                                   vocab=131072, heads=(32, 8, 128), comfyui_name="mistral3_24b")

# every released encoder sdkit names, whether or not a family of its own uses it
RELEASED_ENCODERS = (CLIP_L, CLIP_G, OPENCLIP_H, T5_XXL, CHATGLM3, UMT5_XXL, QWEN3_06B, QWEN3_4B,
                     QWEN3_8B, QWEN25_VL_7B, GEMMA2_2B, LLAMA31_8B, MISTRAL_SMALL_31)
DECODER_ARCHITECTURES = ("qwen3", "qwen2.5-vl", "gemma2", "gemma3", "llama")


def with_component(spec: TextEncoderSpec, component: str) -> TextEncoderSpec:
    return replace(spec, component=component)
