"""Tiny models for identification tests, built with the peers' own classes.

Layouts follow the real families with small widths: SD1 (cross-attention UNet, one
quick-GELU CLIP), SD2 (Linear proj_in, GELU encoder), SDXL base (text_time ADM, two
encoders), SDXL refiner (ADM from the bigG encoder only, 5 time ids). Single-file (LDM)
versions are made with sdkit's own key maps; full-size shapes appear only as a handful of
decisive keys on empty tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from sdkit.io.model_file import ModelFile, TensorInfo, model_from_tensors

TIME_DIM = 8  # SDXL addition_time_embed_dim of the tiny models
TEXT_WIDTH = 32


def tiny_unet(layout: str = "sd1", **overrides: Any):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    settings: dict[str, Any] = dict(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        attention_head_dim=4, cross_attention_dim=TEXT_WIDTH,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if layout == "sd2":
        settings.update(use_linear_projection=True)
    if layout in ("sdxl", "refiner"):
        context = 2 * TEXT_WIDTH if layout == "sdxl" else TEXT_WIDTH
        time_ids = 6 if layout == "sdxl" else 5
        settings.update(
            use_linear_projection=True, cross_attention_dim=context, addition_embed_type="text_time",
            addition_time_embed_dim=TIME_DIM, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=time_ids * TIME_DIM + TEXT_WIDTH,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    settings.update(overrides)
    return UNet2DConditionModel(**settings)


def tiny_clip(hidden_act: str = "quick_gelu", projection: bool = False, width: int = TEXT_WIDTH):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=4, hidden_act=hidden_act,
                            projection_dim=width, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                         latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2)


_PIPELINES = {
    "sd1": ("StableDiffusionPipeline", "sd1", [("text_encoder", "quick_gelu", False)]),
    "sd2": ("StableDiffusionPipeline", "sd2", [("text_encoder", "gelu", False)]),
    "sdxl": ("StableDiffusionXLPipeline", "sdxl",
             [("text_encoder", "quick_gelu", False), ("text_encoder_2", "gelu", True)]),
    "refiner": ("StableDiffusionXLImg2ImgPipeline", "refiner", [("text_encoder_2", "gelu", True)]),
}


def _config(model: Any) -> dict[str, Any]:
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    return json.loads(json.dumps(config, default=str))


def pipeline_parts(family: str, **unet_overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(modules by component, model_index) of a tiny pipeline of this layout."""
    class_name, unet_layout, encoders = _PIPELINES[family]
    modules: dict[str, Any] = {"unet": tiny_unet(unet_layout, **unet_overrides), "vae": tiny_vae()}
    for name, act, projection in encoders:
        modules[name] = tiny_clip(act, projection)
    index = {"_class_name": class_name, "_diffusers_version": "0.42.1"}
    index.update({name: ["diffusers" if name in ("unet", "vae") else "transformers", type(m).__name__]
                  for name, m in modules.items()})
    return modules, index


def diffusers_model_file(modules: Mapping[str, Any], index: Mapping[str, Any] | None,
                         path: str = "<pipeline>") -> ModelFile:
    """An in-memory diffusers-folder ModelFile, laid out as the folder reader lays it out."""
    components = {name: model_from_tensors(m.state_dict()) for name, m in modules.items()}
    infos = {f"{c}/{k}": TensorInfo(f"{c}/{k}", i.dtype, i.shape)
             for c, model in components.items() for k, i in model.infos.items()}

    def load(name: str) -> torch.Tensor:
        component, key = name.split("/", 1)
        return components[component].load(key)

    configs = {name: _config(m) for name, m in modules.items()}
    return ModelFile(path=Path(path), format="diffusers", infos=infos,
                     extra={"model_index": dict(index) if index else None, "configs": configs},
                     components=components, _loader=load)


def ldm_tensors(family: str, **unet_overrides: Any) -> dict[str, torch.Tensor]:
    """A tiny single-file (LDM / A1111) checkpoint state dict, through sdkit's key maps."""
    from sdkit.arch.keymaps import checkpoint_to_ldm, convert_state_dict

    modules, _ = pipeline_parts(family, **unet_overrides)
    tensors = {f"{c}/{k}": t for c, m in modules.items() for k, t in m.state_dict().items()}
    configs = {name: _config(m) for name, m in modules.items()}
    plan = checkpoint_to_ldm(tensors, configs)
    return convert_state_dict(plan.plan, tensors)


UNET_TARGETS = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
ATTENTION_TARGETS = ["Transformer2DModel"]
TEXT_TARGETS = ["CLIPAttention", "CLIPMLP"]


def empty(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A tensor of a full-size shape without its memory (only the header matters)."""
    return torch.empty(shape, dtype=dtype, device="meta")
