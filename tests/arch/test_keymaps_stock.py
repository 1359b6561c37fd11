"""Configs of released-size models: the settings no weight shape carries come from the
released model's config; other sizes are refused with the settings named.

The released models are built from their published diffusers configs on the meta device
(names and shapes only), mapped to single-file shapes, and read back from those shapes.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdkit.arch.keymaps import checkpoint_from_ldm, checkpoint_to_ldm, convert_state_dict
from sdkit.arch.keymaps.stock import complete_configs, needs_config_message
from sdkit.errors import SdkitError

# the published diffusers configs (stable-diffusion-v1-5, stable-diffusion-2-1,
# stable-diffusion-xl-base-1.0 and -refiner-1.0), the values that shape or drive the model
SD_LEVELS = dict(down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
              max_position_embeddings=77, vocab_size=49408, hidden_act="gelu")
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280)
XL_UNET = dict(layers_per_block=2, use_linear_projection=True, addition_embed_type="text_time",
               addition_time_embed_dim=256, sample_size=128, norm_num_groups=32)
RELEASED: dict[str, dict[str, dict[str, Any]]] = {
    "sd1": {"unet": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
                         cross_attention_dim=768, sample_size=64, norm_num_groups=32, **SD_LEVELS),
            "vae": dict(VAE, scaling_factor=0.18215, sample_size=512),
            "text_encoder": CLIP_L},
    "sd2": {"unet": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                         attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                         sample_size=96, norm_num_groups=32, **SD_LEVELS),
            "vae": dict(VAE, scaling_factor=0.18215, sample_size=512),
            "text_encoder": CLIP_H},
    "sdxl": {"unet": dict(XL_UNET, block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                          attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                          projection_class_embeddings_input_dim=2816,
                          down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                          up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
             "vae": dict(VAE, scaling_factor=0.13025, sample_size=1024),
             "text_encoder": dict(CLIP_L, projection_dim=768),
             "text_encoder_2": CLIP_BIG_G},
    "sdxl_refiner": {"unet": dict(XL_UNET, block_out_channels=[384, 768, 1536, 1536], transformer_layers_per_block=4,
                                  attention_head_dim=[6, 12, 24, 24], cross_attention_dim=1280,
                                  projection_class_embeddings_input_dim=2560,
                                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                    "DownBlock2D"],
                                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                  "UpBlock2D"]),
                     "vae": dict(VAE, scaling_factor=0.13025, sample_size=1024),
                     "text_encoder_2": CLIP_BIG_G},
}
PROJECTED = ("text_encoder_2",)


def meta_module(component: str, config: dict[str, Any], ldm_layers: int | None = None) -> torch.nn.Module:
    with torch.device("meta"):
        if component == "unet":
            return UNet2DConditionModel(**config)
        if component == "vae":
            return AutoencoderKL(**config)
        settings = dict(config, num_hidden_layers=ldm_layers or config["num_hidden_layers"])
        text = CLIPTextConfig(**settings)
        text.architectures = ["CLIPTextModelWithProjection" if component in PROJECTED else "CLIPTextModel"]
        return (CLIPTextModelWithProjection if component in PROJECTED else CLIPTextModel)(text)


@lru_cache(maxsize=None)
def ldm_shapes(layout: str, changed: tuple[tuple[str, str, Any], ...] = ()) -> dict[str, tuple[int, ...]]:
    """Single-file names and shapes of the released model, with (component, setting, value) changes."""
    configs = {component: dict(config) for component, config in RELEASED[layout].items()}
    for component, name, value in changed:
        configs[component][name] = value
    # SD 2's single file holds all 24 OpenCLIP layers; diffusers' encoder stops one early
    modules = {c: meta_module(c, config, 24 if layout == "sd2" and c == "text_encoder" else None)
               for c, config in configs.items()}
    state = {f"{c}/{key}": value for c, module in modules.items() for key, value in module.state_dict().items()}
    as_configs = {c: json.loads(json.dumps(m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config),
                                           default=str)) for c, m in modules.items()}
    plan = checkpoint_to_ldm(state, as_configs, layout).plan
    return {key: tuple(value.shape) for key, value in convert_state_dict(plan, state).items()}


@pytest.mark.parametrize("layout", list(RELEASED))
def test_released_sizes_get_the_released_configs(layout):
    derived = checkpoint_from_ldm(ldm_shapes(layout), layout=layout).configs
    completed = complete_configs(layout, derived)
    assert set(completed) == set(RELEASED[layout])
    for component, released in RELEASED[layout].items():
        wrong = {name: (completed[component].get(name), value) for name, value in released.items()
                 if json.dumps(completed[component].get(name)) != json.dumps(value)}
        assert not wrong, (component, wrong)
    assert needs_config_message(layout, derived, derived) is None


@pytest.mark.parametrize(("layout", "component", "setting", "value"), [
    ("sd1", "unet", "in_channels", 9),  # inpainting: heads, groups and sample size are the base model's
    ("sd1", "text_encoder", "vocab_size", 49410),  # two embeddings added to the vocabulary
    ("sdxl", "unet", "in_channels", 9),
])
def test_sizes_that_do_not_bear_on_the_unsaid_settings_still_count_as_released(layout, component, setting, value):
    derived = checkpoint_from_ldm(ldm_shapes(layout, ((component, setting, value),)), layout=layout).configs
    completed = complete_configs(layout, derived)
    assert completed[component][setting] == value
    assert completed["unet"]["attention_head_dim"] == RELEASED[layout]["unet"]["attention_head_dim"]


UNSAID = {"unet": "attention_head_dim, norm_num_groups, sample_size", "vae": "norm_num_groups, scaling_factor, sample_size",
          "text_encoder": "num_attention_heads, hidden_act", "text_encoder_2": "num_attention_heads, hidden_act"}


@pytest.mark.parametrize(("layout", "component", "setting", "value"), [
    ("sd1", "unet", "block_out_channels", (320, 640, 1280, 1920)),
    ("sd1", "unet", "layers_per_block", 1),
    ("sd2", "unet", "cross_attention_dim", 768),
    ("sdxl", "vae", "block_out_channels", (64, 128, 256, 256)),
    ("sdxl", "text_encoder_2", "hidden_size", 1024),
    ("sd1", "text_encoder", "num_hidden_layers", 6),
])
def test_other_sizes_are_refused_with_the_settings_named(layout, component, setting, value):
    changed = ((component, setting, value),)
    if setting == "hidden_size":
        changed += ((component, "num_attention_heads", 16),)
    derived = checkpoint_from_ldm(ldm_shapes(layout, changed), layout=layout).configs
    with pytest.raises(SdkitError) as caught:
        complete_configs(layout, derived)
    message = str(caught.value)
    assert f"{component} {UNSAID[component]} ({setting} " in message
    assert "--config" in message and "\n" not in message
    others = {c: config for c, config in derived.items() if c != component}
    assert set(complete_configs(layout, others)) == set(others)  # the released-size parts are fine
