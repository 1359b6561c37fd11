"""Adapter names on transformer denoisers: every family with a key map, both conventions,
lone or under `model.diffusion_model.`; fused parts by rows, fused modules over parts,
swapped halves, and every trainer's spelling."""

from __future__ import annotations

import math

import pytest
import torch

from fixtures.families.released import TINY, tiny_tensors
from sdkit.adapters.lora_names import adapter_address
from sdkit.adapters.transformer_names import find_denoiser, part_rows, transformer_names
from sdkit.arch.keymaps.transformer import transformer_links
from sdkit.io import lazy_tensors, model_from_tensors

FAMILIES = sorted(TINY)
ROOT = "model.diffusion_model."


def index(tensors: dict[str, torch.Tensor]):
    model = model_from_tensors(tensors)
    found = find_denoiser(model)
    assert found is not None
    root, match = found
    return transformer_names(lazy_tensors(model), root, match), match


@pytest.fixture(scope="module")
def flux():
    return {"ldm": index(tiny_tensors("flux", "ldm"))[0],
            "rooted": index({ROOT + k: v for k, v in tiny_tensors("flux", "ldm").items()})[0],
            "diffusers": index(tiny_tensors("flux", "diffusers"))[0]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("convention", ["ldm", "diffusers"])
def test_every_weight_is_reached_by_its_own_path_and_no_name_is_ambiguous(family, convention):
    tensors = tiny_tensors(family, convention)
    names, match = index(tensors)
    assert match.family.name == family
    for key, value in tensors.items():
        if key.endswith(".weight") and value.dim() >= 1:
            target, reason = names.resolve("diffusion_model." + key[: -len(".weight")])
            assert reason is None, (key, reason)
            assert any(p.weight.key == key for p in target.placements())
    ambiguous = [name for name, target in names.names.items() if target is None]
    assert not ambiguous


@pytest.mark.parametrize("family", [f for f in FAMILIES if not TINY[f][0].startswith(("HiDream", "QwenImage"))])
def test_both_conventions_name_every_linked_weight_on_either_base(family):
    """Each link's single-file and diffusers paths reach a layer of the same rows count on
    a single-file base and on a diffusers base."""
    ldm_names, match = index(tiny_tensors(family, "ldm"))
    diffusers_names, _ = index(tiny_tensors(family, "diffusers"))
    for link in transformer_links(match.family.key_map, match.dims):
        paths = [name for name in (*link.ldm, *link.diffusers) if name.endswith(".weight")]
        if link.kind == "unused" or len(paths) != len(link.ldm) + len(link.diffusers):
            continue
        for path in paths:
            on_ldm, why = ldm_names.resolve("transformer." + path[: -len(".weight")])
            on_diffusers, why_not = diffusers_names.resolve("transformer." + path[: -len(".weight")])
            if on_ldm is None or on_diffusers is None:  # a place this config lacks
                assert on_ldm is None and on_diffusers is None, (path, why, why_not)
                continue
            assert on_ldm.shape == on_diffusers.shape, path


def test_diffusers_parts_of_fused_tensors_are_their_rows(flux):
    names = flux["ldm"]
    hidden = 32
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        target, _ = names.resolve(f"transformer.transformer_blocks.0.attn.{part}")
        assert target.weight.key == "double_blocks.0.img_attn.qkv.weight"
        assert target.weight.rows == (i * hidden, (i + 1) * hidden)
        assert target.bias.key == "double_blocks.0.img_attn.qkv.bias" and target.bias.rows == target.weight.rows
    mlp, _ = names.resolve("transformer.single_transformer_blocks.0.proj_mlp")
    assert mlp.weight.key == "single_blocks.0.linear1.weight"
    assert mlp.weight.rows == (3 * hidden, 3 * hidden + 128)


def test_a_fused_module_on_a_diffusers_base_is_cut_over_the_parts(flux):
    target, _ = flux["diffusers"].resolve("lora_unet_single_blocks_0_linear1")
    assert target.shape == (224, 32)
    placed = [(p.weight.key, p.delta_rows, p.bias.key) for p in target.placements()]
    assert placed == [(f"single_transformer_blocks.0.{part}.weight", rows, f"single_transformer_blocks.0.{part}.bias")
                      for part, rows in (("attn.to_q", (0, 32)), ("attn.to_k", (32, 64)),
                                         ("attn.to_v", (64, 96)), ("proj_mlp", (96, 224)))]


@pytest.mark.parametrize("base, name, own", [
    ("ldm", "transformer.norm_out.linear", "final_layer.adaLN_modulation.1.weight"),
    ("diffusers", "lora_unet_final_layer_adaLN_modulation_1", "norm_out.linear.weight"),
])
def test_the_other_conventions_modulation_gets_its_halves_exchanged(flux, base, name, own):
    target, _ = flux[base].resolve(name)
    pieces = target.placements()
    assert [(p.weight.key, p.weight.rows, p.delta_rows) for p in pieces] == [(own, (0, 32), (32, 64)),
                                                                              (own, (32, 64), (0, 32))]
    straight, _ = flux[base].resolve("diffusion_model." + own[: -len(".weight")])
    assert not straight.pieces


@pytest.mark.parametrize("name", [
    "lora_unet_double_blocks_0_img_attn_proj", "diffusion_model.double_blocks.0.img_attn.proj",
    "transformer.transformer_blocks.0.attn.to_out.0", "lora_transformer_transformer_blocks_0_attn_to_out_0",
    "base_model.model.transformer_blocks.0.attn.to_out.0", "lycoris_transformer_blocks_0_attn_to_out_0",
    "transformer_blocks.0.attn.to_out.0", "base_model.model.transformer.transformer_blocks.0.attn.to_out.0",
    "model.diffusion_model.double_blocks.0.img_attn.proj",
])
@pytest.mark.parametrize("base", ["ldm", "rooted", "diffusers"])
def test_every_trainers_spelling_reaches_the_layer(flux, name, base):
    target, reason = flux[base].resolve(name)
    assert reason is None, reason
    key = {"ldm": "double_blocks.0.img_attn.proj.weight", "rooted": ROOT + "double_blocks.0.img_attn.proj.weight",
           "diffusers": "transformer_blocks.0.attn.to_out.0.weight"}[base]
    assert target.weight.key == key and target.pieces == ()


def test_lone_and_rooted_single_files_index_alike(flux):
    lone = {name: (t.weight.key, t.weight.rows) for name, t in flux["ldm"].names.items()}
    rooted = {name: (t.weight.key.removeprefix(ROOT), t.weight.rows) for name, t in flux["rooted"].names.items()}
    assert lone == rooted


def test_part_rows():
    assert part_rows(None, 3, 96) == [(0, 32), (32, 64), (64, 96)]
    assert part_rows((32, 32, 32, None), 4, 224) == [(0, 32), (32, 64), (64, 96), (96, 224)]
    assert part_rows((32, 8, 8), 3, 48) == [(0, 32), (32, 40), (40, 48)]


def test_transformer_adapter_prefixes():
    assert adapter_address("lora_transformer_single_transformer_blocks_0_attn_to_q") == \
        ("unet", "single_transformer_blocks_0_attn_to_q")
    assert adapter_address("transformer.single_transformer_blocks.0.attn.to_q") == \
        ("unet", "single_transformer_blocks_0_attn_to_q")
    assert adapter_address("base_model.model.diffusion_model.img_in") == ("unet", "img_in")
    # a text encoder's OpenCLIP path is not mistaken for a transformer root
    assert adapter_address("lora_te2_transformer_resblocks_0_attn_out_proj")[0] == "text_encoder_2"


def test_weights_only_float_tensors():
    tensors = tiny_tensors("flux", "ldm")
    tensors["double_blocks.0.img_attn.proj.weight"] = tensors["double_blocks.0.img_attn.proj.weight"].to(torch.int8)
    names, _ = index(tensors)
    target, reason = names.resolve("lora_unet_double_blocks_0_img_attn_proj")
    assert target is None and "no layer" in reason
    assert math.prod(names.resolve("lora_unet_img_in")[0].shape) == 32 * 4
