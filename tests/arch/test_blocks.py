"""Block ids of real SD1.5 and SDXL UNet keys.

The key names come from diffusers' own `UNet2DConditionModel` built with the released
configs on the meta device (no weights), mapped to LDM names by sdkit's key map. The
expected block of every key is derived independently from its diffusers name: the LDM
numbering runs conv_in, then per level one block per resnet and one for the downsampler;
the output side runs per up level one block per resnet, the upsampler sharing the last.
"""

from __future__ import annotations

import re
from functools import lru_cache

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdkit.arch.blocks import (BASE, BlockLayout, block_layout, component_of,
                               diffusers_unet_blocks)
from sdkit.arch.keymaps.unet import unet_plan_for_keys

UNET = "model.diffusion_model."
SD15_CONFIG = {"cross_attention_dim": 768}  # every other field: diffusers' SD1.5 defaults
SDXL_CONFIG = {
    "sample_size": 128, "cross_attention_dim": 2048, "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}


@lru_cache(maxsize=None)
def real_unet(which: str) -> tuple[dict, tuple[str, ...]]:
    config = SD15_CONFIG if which == "sd15" else SDXL_CONFIG
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return dict(unet.config), tuple(unet.state_dict())


def expected_block(diffusers_key: str, levels: int, layers: int = 2) -> str:
    per_level = layers + 1
    if diffusers_key.startswith("conv_in."):
        return "IN00"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", diffusers_key):
        return f"IN{1 + int(m[1]) * per_level + int(m[3]):02d}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.", diffusers_key):
        return f"IN{(int(m[1]) + 1) * per_level:02d}"
    if diffusers_key.startswith("mid_block."):
        return "M00"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", diffusers_key):
        return f"OUT{int(m[1]) * per_level + int(m[3]):02d}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.", diffusers_key):
        return f"OUT{int(m[1]) * per_level + layers:02d}"
    if diffusers_key.startswith(("conv_norm_out.", "conv_out.")):
        return f"OUT{levels * per_level - 1:02d}"
    assert diffusers_key.startswith(("time_embedding.", "add_embedding.")), diffusers_key
    return BASE


@pytest.mark.parametrize("which,levels,count", [("sd15", 4, 26), ("sdxl", 3, 20)])
def test_every_real_unet_key_gets_its_structural_block(which: str, levels: int, count: int) -> None:
    config, diffusers_keys = real_unet(which)
    plan = unet_plan_for_keys(config, diffusers_keys, "diffusers_to_ldm")
    ldm_keys = [UNET + key for key in plan]
    layout = block_layout(ldm_keys)
    assert len(layout.ids) == count
    seen = set()
    for ldm, recipe in plan.items():
        expected = {expected_block(source, levels) for source in recipe.sources}
        assert len(expected) == 1
        block = layout.block_of(UNET + ldm)
        assert block == expected.pop(), ldm
        seen.add(block)
    assert seen == set(layout.ids)  # every id names real keys


def test_layout_ids_in_supermerger_order() -> None:
    config, keys = real_unet("sd15")
    layout = block_layout(UNET + k for k in unet_plan_for_keys(config, keys, "diffusers_to_ldm"))
    assert layout.ids == ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00",
                          *(f"OUT{i:02d}" for i in range(12)))
    assert layout.describe() == "BASE, IN00–IN11, M00, OUT00–OUT11"


def test_sdxl_keys_outside_blocks() -> None:
    config, keys = real_unet("sdxl")
    layout = block_layout(UNET + k for k in unet_plan_for_keys(config, keys, "diffusers_to_ldm"))
    assert layout.block_of(UNET + "time_embed.0.weight") == BASE
    assert layout.block_of(UNET + "label_emb.0.0.weight") == BASE
    assert layout.block_of(UNET + "out.2.weight") == "OUT08"
    assert layout.block_of(UNET + "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0.weight") == "OUT02"


def test_diffusers_names_map_through_the_key_map() -> None:
    config, keys = real_unet("sd15")
    blocks = diffusers_unet_blocks(config, keys)
    assert set(blocks) == set(keys)
    assert all(blocks[key] == expected_block(key, 4) for key in keys)


def test_components_and_non_unet_blocks() -> None:
    layout = BlockLayout(input_blocks=12, output_blocks=12, has_middle=True)
    assert layout.block_of("cond_stage_model.transformer.text_model.final_layer_norm.weight") == BASE
    assert layout.block_of("conditioner.embedders.1.model.ln_final.weight") == BASE
    assert layout.block_of("first_stage_model.decoder.conv_in.weight") is None
    assert layout.block_of("model_ema.diffusion_modelinput_blocks00weight") is None
    assert component_of("conditioner.embedders.0.transformer.text_model.embeddings.position_ids") == "text_encoder"
    assert component_of("conditioner.embedders.1.model.ln_final.weight") == "text_encoder_2"
    assert component_of("conditioner.embedders.0.model.ln_final.weight") == "text_encoder_2"  # refiner
    assert component_of("first_stage_model.encoder.conv_in.weight") == "vae"
    assert component_of("alphas_cumprod") == "other"
    # files of one component, without the checkpoint prefixes
    assert component_of("input_blocks.1.1.proj_in.weight") == "unet"
    assert layout.block_of("input_blocks.1.1.proj_in.weight") == "IN01"
    assert component_of("decoder.up.0.block.0.conv1.weight") == "vae"


def test_tiny_unet_layout_comes_from_its_keys() -> None:
    keys = [UNET + k for k in ("input_blocks.0.0.weight", "input_blocks.4.0.op.weight",
                               "middle_block.1.norm.weight", "output_blocks.5.0.skip.weight",
                               "out.0.weight", "time_embed.0.weight")]
    layout = block_layout(keys)
    assert layout.ids == ("BASE", *(f"IN{i:02d}" for i in range(5)), "M00",
                          *(f"OUT{i:02d}" for i in range(6)))
    assert layout.block_of(UNET + "out.0.weight") == "OUT05"


@pytest.mark.parametrize("which,levels,named", [
    ("sd15", 4, {"IN04": 0.25, "M00": 0.5, "OUT11": 1.0}),
    ("sdxl", 3, {"BASE": 0.75, "IN08": 0.25, "OUT08": 1.0}),
])
def test_block_weights_reach_exactly_the_named_blocks(which: str, levels: int, named: dict) -> None:
    from sdkit.ops.block_weights import KeyWeights, resolve_blocks

    config, diffusers_keys = real_unet(which)
    plan = unet_plan_for_keys(config, diffusers_keys, "diffusers_to_ldm")
    layout = block_layout(UNET + key for key in plan)
    weights = KeyWeights(alpha=0.0, blocks=resolve_blocks(named, layout), layout=layout)
    for ldm, recipe in plan.items():
        expected = named.get(expected_block(recipe.sources[0], levels), 0.0)
        assert weights.alpha_for(UNET + ldm) == expected, ldm
