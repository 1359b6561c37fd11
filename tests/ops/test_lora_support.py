"""Tiny models and adapters for the LoRA bake / merge / extract tests (helpers only).

Models are built with the peers' own classes (diffusers UNet / VAE, transformers CLIP)
at toy widths in the SD1 and SDXL layouts; adapters are made by peft (diffusers
naming) or LyCORIS, or written by hand in kohya naming from a model's own layer list.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable

import pytest
import torch
from safetensors.torch import save_file

TEXT = dict(vocab_size=1000, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny tensors: one thread is many times faster than several contended ones (import
    this fixture into a test module to use it there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(layout: str = "sd1", seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    settings: dict[str, Any] = dict(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        attention_head_dim=4, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if layout == "sdxl":
        settings.update(use_linear_projection=True, cross_attention_dim=64, addition_embed_type="text_time",
                        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                        projection_class_embeddings_input_dim=6 * 8 + 32,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    return UNet2DConditionModel(**settings).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                         latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2).eval()


def tiny_clip(act: str = "quick_gelu", projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=32, hidden_act=act, projection_dim=32, **TEXT)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_pipeline(layout: str = "sd1", seed: int = 0):
    """A StableDiffusion(XL)Pipeline of tiny random models (no tokenizer)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = dict(unet=tiny_unet(layout, seed), vae=tiny_vae(seed), scheduler=DDIMScheduler())
    if layout == "sdxl":
        return StableDiffusionXLPipeline(text_encoder=tiny_clip(seed=seed), tokenizer=None,
                                         text_encoder_2=tiny_clip("gelu", True, seed + 1), tokenizer_2=None,
                                         **parts)
    return StableDiffusionPipeline(text_encoder=tiny_clip(seed=seed), tokenizer=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False, **parts)


def components(pipe: Any) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None}


def configs(pipe: Any) -> dict[str, dict]:
    out = {}
    for name, module in components(pipe).items():
        config = module.config
        out[name] = json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config),
                                          default=str))
    return out


def diffusers_state(pipe: Any) -> dict[str, torch.Tensor]:
    """`<component>/<key>` tensors of a pipeline."""
    return {f"{name}/{key}": value.detach().clone()
            for name, module in components(pipe).items() for key, value in module.state_dict().items()}


def ldm_state(pipe: Any) -> dict[str, torch.Tensor]:
    from sdkit.arch.keymaps import checkpoint_to_ldm, convert_state_dict

    tensors = diffusers_state(pipe)
    return convert_state_dict(checkpoint_to_ldm(tensors, configs(pipe)).plan, tensors)


def ldm_to_diffusers(tensors: dict[str, torch.Tensor], pipe: Any) -> dict[str, torch.Tensor]:
    from sdkit.arch.keymaps import checkpoint_from_ldm, convert_state_dict

    shapes = {key: tuple(value.shape) for key, value in tensors.items()}
    return convert_state_dict(checkpoint_from_ldm(shapes, configs(pipe)).plan, tensors)


def save_ldm(pipe: Any, path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in ldm_state(pipe).items()}, str(path), metadata=metadata)
    return path


def save_folder(pipe: Any, folder: Path) -> Path:
    pipe.save_pretrained(str(folder))
    return folder


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """`<component>/<key>` tensors of a saved pipeline folder."""
    from safetensors.torch import load_file

    out = {}
    for weights in sorted(folder.glob("*/*.safetensors")):
        out.update({f"{weights.parent.name}/{key}": value for key, value in load_file(str(weights)).items()})
    return out


def randomize_lora(*modules: torch.nn.Module, seed: int = 3, scale: float = 0.1) -> None:
    """peft initialises lora_B to zero: give every adapter parameter values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, parameter in module.named_parameters():
                if "lora_" in name:
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def peft_lora_file(pipe: Any, folder: Path, *, rank: int = 4, unet_alpha: float = 2.0,
                   text_alpha: float = 6.0, seed: int = 3) -> Path:
    """A diffusers `pytorch_lora_weights.safetensors` for `pipe` (UNet + first text encoder)."""
    from peft import LoraConfig, get_peft_model_state_dict

    unet_config = LoraConfig(r=rank, lora_alpha=unet_alpha, target_modules=UNET_LORA_TARGETS)
    text_config = LoraConfig(r=rank, lora_alpha=text_alpha, target_modules=TEXT_LORA_TARGETS)
    unet, text = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    unet.add_adapter(unet_config)
    text.add_adapter(text_config)
    randomize_lora(unet, text, seed=seed)
    type(pipe).save_lora_weights(
        str(folder), unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def kohya_lora(modules: Iterable[tuple[str, tuple[int, ...]]], rank: int, alpha: float | None,
               seed: int = 0, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A kohya LoRA state dict: `(module name, layer weight shape)` -> up/down/alpha."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in modules:
        out, rest = shape[0], shape[1:]
        down_shape = (rank, *rest) if len(rest) == 3 else (rank, rest[0])
        up_shape = (out, rank, 1, 1) if len(rest) == 3 else (out, rank)
        state[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=generator) * scale
        state[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=generator) * scale
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state


def lora_delta(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """alpha / rank · up @ down of a kohya module, shaped as its layer."""
    up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
    rank = down.shape[0]
    alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else rank
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * alpha / rank


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path
