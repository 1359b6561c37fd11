"""Tiny random-weight models for the convert tests (helpers only, no tests here).

The models have the released block structure at tiny widths: SD1.5 (four UNet levels,
two layers each, attention on the first three; a four-level VAE), SD2 (the same with
linear projections and an OpenCLIP-style GELU text encoder), SDXL base (three
levels with transformer depths 1, 2, 10, text_time conditioning, two text encoders of
different widths so diffusers' single-file loader can tell them apart) and the SDXL refiner.
Folders are written by the peers' own `save_pretrained`; single files by sdkit's key maps.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdkit.arch.keymaps import checkpoint_to_ldm, convert_state_dict

VOCAB = 64
TEXT = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=16, layer_norm_eps=1e-5,
            bos_token_id=0, eos_token_id=1, pad_token_id=1)
PIPELINES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline,
             "sdxl_refiner": StableDiffusionXLImg2ImgPipeline}


def _vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=4,
                         latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4)


def _text(width: int, act: str, projection: bool = False) -> torch.nn.Module:
    config = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2,
                            hidden_act=act, projection_dim=width, **TEXT)
    config.architectures = ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"]
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _xl_unet(levels: tuple[str, ...], channels: tuple[int, ...], depths: Any, context: int, time_ids: int,
             up: tuple[str, ...]) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=channels, norm_num_groups=4,
        attention_head_dim=2, transformer_layers_per_block=depths, use_linear_projection=True,
        cross_attention_dim=context, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=time_ids * 4 + 24, down_block_types=levels, up_block_types=up)


def _modules(family: str) -> dict[str, torch.nn.Module]:
    if family == "sd1":
        unet = UNet2DConditionModel(
            sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 16, 16), norm_num_groups=4,
            attention_head_dim=2, cross_attention_dim=16,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        return {"unet": unet, "vae": _vae(), "text_encoder": _text(16, "quick_gelu")}
    if family == "sd2":  # OpenCLIP-H in the single file: GELU, linear proj_in
        unet = UNet2DConditionModel(
            sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 16, 16), norm_num_groups=4,
            attention_head_dim=2, cross_attention_dim=24, use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        return {"unet": unet, "vae": _vae(), "text_encoder": _text(24, "gelu")}
    if family == "sdxl":
        unet = _xl_unet(("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), (8, 16, 16),
                        (1, 2, 10), 16 + 24, 6, ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
        return {"unet": unet, "vae": _vae(), "text_encoder": _text(16, "quick_gelu"),
                "text_encoder_2": _text(24, "gelu", projection=True)}
    unet = _xl_unet(("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    (8, 16, 16, 16), 4, 24, 5, ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    return {"unet": unet, "vae": _vae(), "text_encoder_2": _text(24, "gelu", projection=True)}


@lru_cache(maxsize=None)
def modules(family: str) -> dict[str, torch.nn.Module]:
    """The components of a tiny model of `family`, every tensor random (normal, std 0.2)."""
    torch.manual_seed(0)
    parts = _modules(family)
    with torch.no_grad():
        for part in parts.values():
            for tensor in part.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(torch.randn(tensor.shape) * 0.2)
    return {name: part.eval() for name, part in parts.items()}


def state(family: str) -> dict[str, torch.Tensor]:
    """`<component>/<key>` tensors of the tiny model."""
    return {f"{name}/{key}": value for name, part in modules(family).items()
            for key, value in part.state_dict().items()}


def configs(family: str) -> dict[str, dict]:
    return {name: json.loads(json.dumps(dict(part.config) if name in ("unet", "vae") else part.config.to_dict(),
                                        default=str)) for name, part in modules(family).items()}


def ldm_state(family: str) -> dict[str, torch.Tensor]:
    """The tiny model as a single-file (LDM) state dict."""
    tensors = state(family)
    return {k: v.contiguous() for k, v in convert_state_dict(checkpoint_to_ldm(tensors, configs(family)).plan,
                                                             tensors).items()}


def write_ldm(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    words = ["<|startoftext|>", "<|endoftext|>"] + [f"w{i}</w>" for i in range(VOCAB - 2)]
    (folder / "vocab.json").write_text(json.dumps({word: i for i, word in enumerate(words)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, bos_token=words[0], eos_token=words[1], unk_token=words[1],
                                         pad_token=words[1])


def write_pipeline(family: str, folder: Path, weights: bool = True) -> Path:
    """The tiny model as a diffusers folder (`weights=False`: configs, tokenizers, scheduler only)."""
    parts: dict[str, Any] = dict(modules(family))
    tok = tokenizer(folder.parent / f"{folder.name}-vocab")
    if family in ("sd1", "sd2"):
        pipe = StableDiffusionPipeline(**parts, tokenizer=tok, scheduler=PNDMScheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    elif family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, tokenizer=tok, tokenizer_2=tok, scheduler=EulerDiscreteScheduler())
    else:
        pipe = StableDiffusionXLImg2ImgPipeline(**parts, text_encoder=None, tokenizer=None, tokenizer_2=tok,
                                                scheduler=EulerDiscreteScheduler(), requires_aesthetics_score=True)
    pipe.save_pretrained(folder)
    if not weights:
        for path in folder.glob("*/*.safetensors"):
            path.unlink()
    return folder


def pipeline_state(pipe: Any, family: str) -> dict[str, torch.Tensor]:
    """`<component>/<key>` tensors of a loaded pipeline's model components."""
    return {f"{name}/{key}": value for name in modules(family)
            for key, value in getattr(pipe, name).state_dict().items()}


def stored(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`<component>/<key>` tensors as a diffusers folder's weight files hold them: text
    encoder keys under `text_model.` (the projection beside it), which transformers 4 saves
    and ComfyUI's CLIP loader reads (transformers 5 names CLIPTextModel weights without it)."""
    out = {}
    for name, value in state.items():
        component, key = name.split("/", 1)
        if component.startswith("text_encoder") and key != "text_projection.weight" and \
                not key.startswith("text_model."):
            key = "text_model." + key
        out[f"{component}/{key}"] = value
    return out


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same keys, and every tensor equal in dtype, shape and bits."""
    assert sorted(actual) == sorted(expected)
    different = [k for k in expected if actual[k].dtype != expected[k].dtype or not torch.equal(actual[k], expected[k])]
    assert not different, different[:5]
