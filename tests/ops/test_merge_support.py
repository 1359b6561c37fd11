"""Tiny random-weight checkpoints for the merge tests (helpers only, no tests here).

The tensors follow the real SD1 / SDXL LDM single-file layouts: diffusers modules with
the released block structure and tiny widths give the names and shapes, sdkit's key map
renames them to LDM keys, and each seed fills them with its own random values.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdkit.arch.keymaps import checkpoint_from_ldm, checkpoint_to_ldm

TEXT = {"vocab_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 8, "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2,
        "pad_token_id": 1}


def _vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                         latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2)


def _sd1_modules() -> dict[str, torch.nn.Module]:
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 16, 16), norm_num_groups=4,
        attention_head_dim=2, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=16, hidden_act="quick_gelu", **TEXT))
    return {"unet": unet, "vae": _vae(), "text_encoder": text}


def _sdxl_modules() -> dict[str, torch.nn.Module]:
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 16), norm_num_groups=4,
        attention_head_dim=2, transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    text_1 = CLIPTextModel(CLIPTextConfig(hidden_size=16, hidden_act="quick_gelu", **TEXT))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=16,
                                                        hidden_act="gelu", **TEXT))
    return {"unet": unet, "vae": _vae(), "text_encoder": text_1, "text_encoder_2": text_2}


@cache
def layout(family: str) -> tuple[dict[str, dict], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """(diffusers configs, LDM key -> (shape, dtype)) of the tiny model of `family`."""
    modules = _sd1_modules() if family == "sd1" else _sdxl_modules()
    configs = {name: _config(module) for name, module in modules.items()}
    tensors = {f"{name}/{key}": value for name, module in modules.items()
               for key, value in module.state_dict().items()}
    plan = checkpoint_to_ldm(tensors, configs).plan
    shapes = {key: (tuple(r.apply([tensors[s] for s in r.sources]).shape),
                    r.apply([tensors[s] for s in r.sources]).dtype) for key, r in plan.items()}
    return configs, shapes


def _config(module: torch.nn.Module) -> dict:
    config = module.config
    return dict(config) if isinstance(config, dict) or hasattr(config, "keys") else config.to_dict()


def checkpoint(family: str = "sd1", seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random weights (normal, std 0.1) for every LDM key; integer tensors keep their ramp."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, (shape, original) in layout(family)[1].items():
        if original.is_floating_point:
            out[key] = (torch.randn(shape, generator=generator) * 0.1).to(dtype)
        else:
            out[key] = torch.arange(shape[-1], dtype=original).reshape(shape)
    return out


def invoke(*args: str, options: tuple[str, ...] = ()) -> tuple[int, str]:
    """`sdkit [options] merge args…` in process: exit code and output."""
    from click.testing import CliRunner

    from sdkit.cli import merge_cmd  # noqa: F401  (attaches `merge` to the group)
    from sdkit.cli.main import cli

    result = CliRunner().invoke(cli, [*options, "merge", *args], catch_exceptions=False)
    return result.exit_code, result.output


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`sdkit merge args…` as the console script runs it: exit code and stderr."""
    from sdkit.cli import merge_cmd  # noqa: F401
    from sdkit.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["merge", *args])
    return int(exit_info.value.code or 0), capsys.readouterr().err


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_diffusers_folder(folder: Path, family: str, tensors: dict[str, torch.Tensor]) -> Path:
    """The LDM `tensors` saved as a diffusers pipeline folder (configs + weights)."""
    configs = layout(family)[0]
    plan = checkpoint_from_ldm({k: tuple(v.shape) for k, v in tensors.items()}, configs).plan
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, recipe in plan.items():
        component, name = key.split("/", 1)
        parts.setdefault(component, {})[name] = recipe.apply([tensors[s] for s in recipe.sources]).contiguous()
    index = {"_class_name": "StableDiffusionPipeline"}
    for component, state in parts.items():
        (folder / component).mkdir(parents=True)
        (folder / component / "config.json").write_text(json.dumps(configs[component], default=list))
        weights = "diffusion_pytorch_model" if component in ("unet", "vae") else "model"
        save_file(state, str(folder / component / f"{weights}.safetensors"))
        library = "transformers" if component.startswith("text_encoder") else "diffusers"
        index[component] = [library, type(component).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
