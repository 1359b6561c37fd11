"""Full-size SD 1.5 / SD 2.1 / SDXL base single files that cost no disk: real LDM key names
and shapes over a sparse data region (every weight reads as zero).

Names and shapes: the diffusers / transformers classes built on the meta device with
the released models' configs (stable-diffusion-v1-5, stable-diffusion-2-1,
stable-diffusion-xl-base-1.0; the settings not given are the classes' defaults), mapped
to single-file names by sdkit's checkpoint plan, as the benchmark checkpoints are.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))

from released import write_header_only

CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
OPENCLIP_H = {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
              "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu"}
CLIP_BIG_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
              "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
              "projection_dim": 1280}
VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
       "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
UNETS = {
    "sd15": {"sample_size": 64, "cross_attention_dim": 768},
    "sd21": {"sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
             "use_linear_projection": True},
    "sdxl": {"sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
             "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816},
}


def meta_modules(release: str) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        modules = {"unet": UNet2DConditionModel(**UNETS[release]), "vae": AutoencoderKL(**VAE)}
        if release == "sdxl":
            modules["text_encoder"] = CLIPTextModel(CLIPTextConfig(**CLIP_L))
            modules["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G))
        else:
            modules["text_encoder"] = CLIPTextModel(CLIPTextConfig(**(CLIP_L if release == "sd15" else OPENCLIP_H)))
    return modules


def _config(module: torch.nn.Module) -> dict:
    config = module.config
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def ldm_shapes(release: str) -> dict[str, tuple[int, ...]]:
    from sdkit.arch.keymaps import checkpoint_to_ldm, convert_state_dict

    modules = meta_modules(release)
    state = {f"{name}/{key}": value for name, module in modules.items() for key, value in module.state_dict().items()}
    plan = checkpoint_to_ldm(state, {name: _config(module) for name, module in modules.items()}).plan
    return {key: tuple(value.shape) for key, value in convert_state_dict(plan, state).items()}


def write_full_size_checkpoint(path: Path, release: str, markers: tuple[str, ...] = (),
                               metadata: dict[str, str] | None = None) -> Path:
    """A header-only fp16 single file of `release` ("sd15", "sd21", "sdxl"), its CLIP
    position ids written out (int64 0..76, as released files store them); `markers` adds
    empty marker tensors (`v_pred`, `ztsnr`) as NoobAI-style files carry them, `metadata` its
    header metadata."""
    tensors = {name: ("I64" if name.endswith("position_ids") else "F16", shape)
               for name, shape in ldm_shapes(release).items()}
    tensors.update({marker: ("F16", (0,)) for marker in markers})
    write_header_only(path, tensors, {"format": "pt", **(metadata or {})})
    with open(path, "r+b") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
        for name, entry in header.items():
            if name.endswith("position_ids"):
                start, end = entry["data_offsets"]
                file.seek(8 + length + start)
                file.write(struct.pack(f"<{(end - start) // 8}q", *range((end - start) // 8)))
    return path
