"""Merge block ids of the transformer families, in both key conventions.

The keys are the real ones: tiny models of diffusers' own test configs (diffusers
convention) and the single-file listings of `fixtures/families/released.py` (BFL /
Stability / original names, released sizes and tiny). That a diffusers key lands in the
block of its single-file twin is checked through diffusers' own single-file converters:
every single-file tensor is filled with its own number, so each converted tensor tells
which single-file key(s) it came from.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))

from released import (peer_converters, RELEASES, TINY, diffusers_shapes, single_file_shapes,  # noqa: E402
                      tiny_tensors)

from sdkit.arch.block_presets import _SD1_PRESETS, curve, preset_values, unet_preset  # noqa: E402
from sdkit.arch.blocks import BlockLayout, model_block_layout  # noqa: E402
from sdkit.arch.transformer_blocks import (DENOISER_PREFIX, released_transformer_blocks,  # noqa: E402
                                           transformer_blocks)

FAMILIES = sorted(TINY)
# each family's stacks as (id letter, single-file list name, diffusers list name): written
# from the peers' module names, independently of sdkit's derivation from the layouts
STACKS = {
    "flux": (("D", "double_blocks", "transformer_blocks"), ("S", "single_blocks", "single_transformer_blocks")),
    "flux2": (("D", "double_blocks", "transformer_blocks"), ("S", "single_blocks", "single_transformer_blocks")),
    "chroma": (("D", "double_blocks", "transformer_blocks"), ("S", "single_blocks", "single_transformer_blocks")),
    "hidream": (("D", "double_stream_blocks", "double_stream_blocks"),
                ("S", "single_stream_blocks", "single_stream_blocks")),
    "sd3": (("B", "joint_blocks", "transformer_blocks"),),
    "qwen-image": (("B", "transformer_blocks", "transformer_blocks"),),
    "wan": (("B", "blocks", "blocks"),),
    "z-image": (("B", "layers", "layers"),),
    "lumina2": (("B", "layers", "layers"),),
}
# root modules after the last block, per family (single-file names, then diffusers')
OUTPUT_ROOTS = {"final_layer", "norm_out", "proj_out", "head", "all_final_layer", "norm_final", "scale_shift_table"}


def expected_block(family: str, convention: str, key: str) -> str:
    column = 1 if convention == "ldm" else 2
    for stack in STACKS[family]:
        if m := re.match(rf"{re.escape(stack[column])}\.(\d+)\.", key):
            return f"{stack[0]}{int(m[1]):02d}"
    root = key.split(".")[0]
    return "OUT" if root in OUTPUT_ROOTS and (root != "scale_shift_table" or key == root) else "IN"


def tiny_keys(family: str, convention: str) -> list[str]:
    _class, config, single_file = TINY[family]
    if convention == "ldm":
        return list(single_file(config))
    return list(tiny_tensors(family, "diffusers"))


@pytest.mark.parametrize("convention", ["ldm", "diffusers"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_key_of_a_tiny_model_has_its_block(family, convention):
    keys = tiny_keys(family, convention)
    layout = transformer_blocks(family, keys)
    expected = {key: expected_block(family, convention, key) for key in keys}
    assert {key: layout.block_of(key) for key in keys} == expected
    # ids in list order: IN, the stacks as the model runs them, OUT; each holds keys
    stacks = [f"{letter}{i:02d}" for letter, *_ in STACKS[family]
              for i in sorted({int(b[1:]) for b in expected.values() if b.startswith(letter) and b != "IN"})]
    assert layout.ids == ("IN", *stacks, "OUT")
    assert set(expected.values()) == set(layout.ids)


@pytest.mark.parametrize("family", ["flux", "sd3", "wan", "z-image"])
def test_the_checkpoint_prefix_changes_nothing(family):
    keys = tiny_keys(family, "ldm")
    bare = transformer_blocks(family, keys)
    prefixed = transformer_blocks(family, [DENOISER_PREFIX + key for key in keys] + ["vae.decoder.conv_in.weight"])
    assert prefixed.ids == bare.ids
    assert all(prefixed.block_of(DENOISER_PREFIX + key) == bare.block_of(key) for key in keys)
    assert prefixed.component_of("vae.decoder.conv_in.weight") != "unet"
    assert prefixed.block_of("vae.decoder.conv_in.weight") is None


# converters that split fused layers at the released widths: fed the released sizes with
# one block of each kind (each tensor a zero-memory view of its one number)
_RELEASED_WIDTHS = {"flux": ("FLUX.1-dev", dict(num_layers=1, num_single_layers=1)),
                    "chroma": ("Chroma1-HD", dict(num_layers=1, num_single_layers=1, approximator_layers=1)),
                    "lumina2": ("Lumina-Image-2.0", dict(num_layers=1, num_refiner_layers=1))}


def _numbered_single_file(family: str) -> dict[str, torch.Tensor]:
    if family in _RELEASED_WIDTHS:
        release, fewer = _RELEASED_WIDTHS[family]
        model = RELEASES[release]
        shapes = model.single_file(dict(model.config, **fewer))
    else:
        _class, config, single_file = TINY[family]
        shapes = single_file(config)
    return {key: torch.tensor(float(i + 1)).expand(shape) for i, (key, shape) in enumerate(shapes.items())}


def _source_numbers(tensor: torch.Tensor) -> set[int]:
    """The numbers a converted tensor holds: its first and last element (a converter splits
    or concatenates along the first dimension, never interleaves)."""
    return {int(tensor[(0,) * tensor.dim()]), int(tensor[(-1,) * tensor.dim()])}


@pytest.mark.parametrize("family", sorted(peer_converters()))
def test_a_diffusers_key_lands_in_the_block_of_its_single_file_twin(family):
    numbered = _numbered_single_file(family)
    names = list(numbered)
    converted = peer_converters()[family](dict(numbered))
    single = transformer_blocks(family, names)
    diffusers = transformer_blocks(family, converted)
    assert diffusers.ids == single.ids
    for key, tensor in converted.items():
        sources = {names[number - 1] for number in _source_numbers(tensor)}
        assert {single.block_of(source) for source in sources} == {diffusers.block_of(key)}, key


def test_released_flux1_has_supermerger_s_ids_without_the_text_encoders():
    ids = ("IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT")
    model = RELEASES["FLUX.1-dev"]
    assert transformer_blocks("flux", single_file_shapes(model)).ids == ids
    assert transformer_blocks("flux", diffusers_shapes(model)).ids == ids
    (releases, layout), = released_transformer_blocks("flux")
    assert layout.ids == ids and "FLUX.1-dev" in releases and "FLUX.1-schnell" in releases
    assert layout.describe() == "IN, D00–D18, S00–S37, OUT"


@pytest.mark.parametrize("release, count", [("Wan2.1-T2V-14B", 40), ("Wan2.1-T2V-1.3B", 30),
                                            ("Stable Diffusion 3.5 Large", 38), ("Qwen-Image", 60)])
def test_released_single_stack_sizes(release, count):
    model = RELEASES[release]
    layout = transformer_blocks(model.family, single_file_shapes(model))
    assert layout.ids == ("IN", *(f"B{i:02d}" for i in range(count)), "OUT")


def test_comfyui_names_of_numbered_blocks_are_aliases_in_both_conventions():
    layout = transformer_blocks("flux", single_file_shapes(RELEASES["FLUX.1-dev"]))
    for name in ("double_blocks.3.", "double_blocks.3", "transformer_blocks.3."):
        assert layout.aliases[name] == "D03"
    assert layout.aliases["single_transformer_blocks.37."] == "S37"


def test_the_family_picks_the_layout():
    keys = tiny_keys("flux", "ldm")
    assert model_block_layout("flux", keys).ids[0] == "IN"
    assert isinstance(model_block_layout("sd1", ["model.diffusion_model.input_blocks.0.0.weight"]), BlockLayout)


@pytest.mark.parametrize("name", ["GRAD_V", "GRAD_A", "FLAT_25", "FLAT_75", "SMOOTHSTEP", "REVERSE-SMOOTHSTEP",
                                  "COSINE", "REVERSE_COSINE", "ALL_A"])
def test_position_presets_are_supermerger_s_shapes(name):
    """Over SD1's 25 UNet positions the transformer presets give supermerger's values."""
    sd1 = [float(v) for v in _SD1_PRESETS[name].split(",")]
    assert sd1[1:] == pytest.approx(curve(name, 25), abs=1e-9)


def test_sdxl_presets_drop_the_blocks_sdxl_lacks():
    values = unet_preset("GRAD_V", 20)
    assert len(values) == 20
    assert values[:10] == pytest.approx(unet_preset("GRAD_V", 26)[:10])  # BASE, IN00–IN08
    assert values[10] == 0  # M00
    assert values[-1] == pytest.approx(0.75)  # OUT08, SD1's OUT08


def test_transformer_presets_follow_the_position():
    ids = ("IN", "D00", "D01", "S00", "OUT")
    assert preset_values("GRAD_OUT", ids, transformer=True) == [0, 0.25, 0.5, 0.75, 1]
    assert preset_values("grad_in", ids, transformer=True) == [1, 0.75, 0.5, 0.25, 0]
    assert preset_values("GRAD_V", ids, transformer=True) == [1, 0.5, 0, 0.5, 1]


@pytest.mark.parametrize("root", ["net.", ""])
@pytest.mark.parametrize("prefix", ["", DENOISER_PREFIX])
def test_anima_blocks_with_and_without_its_net_module(root, prefix):
    """Anima keeps its whole model under `net.` (ComfyUI holds it without): its 28 DiT
    blocks are B00–B27, the text adapter's blocks and the embedders IN, the final layer OUT."""
    model = RELEASES["Anima-2B"]
    keys = [prefix + root + name.removeprefix("net.") for name in single_file_shapes(model)]
    layout = transformer_blocks("anima", keys)
    assert layout.ids == ("IN", *(f"B{i:02d}" for i in range(28)), "OUT")
    inner = prefix + root
    assert layout.block_of(f"{inner}blocks.27.mlp.layer2.weight") == "B27"
    assert layout.block_of(f"{inner}llm_adapter.blocks.5.mlp.0.weight") == "IN"
    assert layout.block_of(f"{inner}x_embedder.proj.1.weight") == "IN"
    assert layout.block_of(f"{inner}final_layer.adaln_modulation.2.weight") == "OUT"
    assert layout.aliases["blocks.3."] == "B03"
    (releases, released), = released_transformer_blocks("anima")
    assert releases == ["Anima-2B"] and released.ids == layout.ids
