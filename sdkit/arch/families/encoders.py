"""The released text encoders that several families share, under the names people use.

A family takes these and sets the diffusers component that holds each in its pipelines
(`with_component`): SD3 keeps T5-XXL in `text_encoder_3`, FLUX.1 in `text_encoder_2`.
"""

from __future__ import annotations

from dataclasses import replace

from sdkit.arch.families.spec import TextEncoderSpec

CLIP_L = TextEncoderSpec("text_encoder", "clip", 768, "CLIP-L")  # openai/clip-vit-large-patch14
CLIP_G = TextEncoderSpec("text_encoder_2", "openclip", 1280, "CLIP-G")  # OpenCLIP ViT-bigG/14
OPENCLIP_H = TextEncoderSpec("text_encoder", "openclip", 1024, "OpenCLIP ViT-H")  # SD 2.x
T5_XXL = TextEncoderSpec("text_encoder_3", "t5", 4096, "T5-XXL")  # google/t5-v1_1-xxl encoder
CHATGLM3 = TextEncoderSpec("text_encoder", "chatglm", 4096, "ChatGLM3-6B")  # Kolors
# decoder-only language models whose hidden states are the text context
QWEN3_4B = TextEncoderSpec("text_encoder", "qwen3", 2560, "Qwen3-4B")  # Qwen/Qwen3-4B: Z-Image
QWEN25_VL_7B = TextEncoderSpec("text_encoder", "qwen2.5-vl", 3584, "Qwen2.5-VL-7B")  # Qwen-Image
GEMMA2_2B = TextEncoderSpec("text_encoder", "gemma2", 2304, "Gemma-2-2B")  # google/gemma-2-2b: Lumina 2
LLAMA31_8B = TextEncoderSpec("text_encoder_4", "llama", 4096, "Llama-3.1-8B")  # HiDream-I1's fourth encoder
UMT5_XXL = TextEncoderSpec("text_encoder", "umt5", 4096, "UMT5-XXL")  # google/umt5-xxl encoder (Wan)
# FLUX.2's context is three stacked hidden states of a decoder LLM: FLUX.2-dev ships Mistral
# Small 3.1 24B (BFL flux2 `text_encoder.py` pairs 3.1's processor with the 3.2 weights, the
# same architecture: hidden 5120); FLUX.2 Klein 4B / 9B load Qwen/Qwen3-4B / Qwen3-8B
MISTRAL_SMALL_3 = TextEncoderSpec("text_encoder", "mistral", 5120, "Mistral Small 3.1 24B")
QWEN3_8B = TextEncoderSpec("text_encoder", "qwen3", 4096, "Qwen3-8B")


def with_component(spec: TextEncoderSpec, component: str) -> TextEncoderSpec:
    return replace(spec, component=component)
