"""Text encoder maps against transformers' CLIP models and diffusers' single-file CLIP loaders.

Three random-weight encoders: an HF-layout CLIP (SD1 / SDXL encoder 1), an OpenCLIP with
projection (SDXL encoder 2) and an OpenCLIP without one (SD2).
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_open_clip_checkpoint,
    create_diffusers_clip_model_from_ldm,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdkit.arch.keymaps import clip_plan, convert_state_dict, dropped_keys, infer_clip_config_from_ldm, plan_for
from sdkit.errors import SdkitError

TOKEN_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
ENCODERS = {
    # name: (model class, LDM style, single-file prefix, config)
    "clip_l": (CLIPTextModel, "clip", "cond_stage_model.transformer.",
               dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "bigg": (CLIPTextModelWithProjection, "openclip", "conditioner.embedders.1.model.",
             dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                  projection_dim=40, hidden_act="gelu")),
    "sd2": (CLIPTextModel, "openclip", "cond_stage_model.model.",
            dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6, hidden_act="gelu")),
}


@lru_cache(maxsize=None)
def build(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """An encoder's config (as save_pretrained writes it) and random state dict."""
    cls, _, _, settings = ENCODERS[name]
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=100, max_position_embeddings=16, **TOKEN_IDS, **settings)
    config.architectures = [cls.__name__]
    model = cls(config)
    state = {key: torch.randn(value.shape) for key, value in model.state_dict().items()}
    return config.to_dict(), state


def convert(name: str, config: dict, state: dict[str, torch.Tensor], direction: str) -> dict[str, torch.Tensor]:
    return convert_state_dict(plan_for(ENCODERS[name][1], config, state, direction), state)


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    unequal = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not unequal, unequal[:5]


@pytest.mark.parametrize("name", ENCODERS)
def test_full_plan_covers_exactly_the_model_tensors(name):
    config, state = build(name)
    style = "hf" if ENCODERS[name][1] == "clip" else "openclip"
    assert sorted(clip_plan(config, "ldm_to_diffusers", style)) == sorted(state)


@pytest.mark.parametrize("name", ENCODERS)
def test_round_trips_are_bit_identical(name):
    config, state = build(name)
    ldm = convert(name, config, state, "diffusers_to_ldm")
    assert_identical(convert(name, config, ldm, "ldm_to_diffusers"), state)
    assert_identical(convert(name, config, convert(name, config, ldm, "ldm_to_diffusers"), "diffusers_to_ldm"), ldm)


def test_hf_layout_in_ldm_has_text_model_level_and_position_ids():
    config, state = build("clip_l")
    ldm = convert("clip_l", config, state, "diffusers_to_ldm")
    assert all(key.startswith("text_model.") for key in ldm)
    ids = ldm["text_model.embeddings.position_ids"]
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(16)[None])


def test_hf_layout_spellings_are_accepted():
    config, state = build("clip_l")
    ldm = convert("clip_l", config, state, "diffusers_to_ldm")
    # transformers 4 and old diffusers folders: a text_model. level and stored position ids
    old_diffusers = {f"text_model.{k}": v for k, v in state.items()}
    old_diffusers["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    assert_identical(convert("clip_l", config, old_diffusers, "diffusers_to_ldm"), ldm)
    # old LDM files without the text_model. level
    flat_ldm = {k.removeprefix("text_model."): v for k, v in ldm.items()}
    assert_identical(convert("clip_l", config, flat_ldm, "ldm_to_diffusers"), state)


def test_a_tensor_spelled_twice_is_refused():
    config, state = build("clip_l")
    doubled = {**state, "text_model.final_layer_norm.weight": state["final_layer_norm.weight"]}
    with pytest.raises(SdkitError, match="spelled twice"):
        plan_for("clip", config, doubled, "diffusers_to_ldm")


def test_openclip_fuses_attention_and_transposes_projection():
    config, state = build("bigg")
    ldm = convert("bigg", config, state, "diffusers_to_ldm")
    q, k, v = (state[f"text_model.encoder.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    assert torch.equal(ldm["transformer.resblocks.1.attn.in_proj_weight"], torch.cat([q, k, v]))
    assert torch.equal(ldm["text_projection"], state["text_projection.weight"].T)
    assert torch.equal(ldm["positional_embedding"], state["text_model.embeddings.position_embedding.weight"])


@pytest.mark.parametrize("name", ENCODERS)
def test_diffusers_own_ldm_conversion_agrees(name):
    config, state = build(name)
    cls, kind, prefix, _ = ENCODERS[name]
    single_file = {prefix + k: v for k, v in convert(name, config, state, "diffusers_to_ldm").items()}
    if kind == "clip":
        theirs = convert_ldm_clip_checkpoint(single_file)
        del theirs["text_model.embeddings.position_ids"]  # transformers 5 does not store it
    else:
        theirs = convert_open_clip_checkpoint(cls(CLIPTextConfig(**config)), single_file, prefix=prefix)
    if cls is CLIPTextModel:  # flattened in transformers 5; diffusers strips the level when loading
        theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    assert_identical(theirs, state)


@pytest.mark.parametrize("name", ENCODERS)
def test_single_file_loads_back_through_diffusers(name, tmp_path):
    config, state = build(name)
    cls, _, prefix, _ = ENCODERS[name]
    CLIPTextConfig(**config).save_pretrained(tmp_path / "text_encoder")
    single_file = {prefix + k: v for k, v in convert(name, config, state, "diffusers_to_ldm").items()}
    loaded = create_diffusers_clip_model_from_ldm(cls, single_file, config=str(tmp_path), subfolder="text_encoder",
                                                  local_files_only=True)
    assert_identical(loaded.state_dict(), state)


@pytest.mark.parametrize("name", ENCODERS)
def test_inferred_config_loads_the_converted_weights(name):
    config, state = build(name)
    cls = ENCODERS[name][0]
    ldm = convert(name, config, state, "diffusers_to_ldm")
    inferred = infer_clip_config_from_ldm({f"x.{k}": v.shape for k, v in ldm.items()}, prefix="x.")
    assert inferred["architectures"] == [cls.__name__]
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "max_position_embeddings",
                  "hidden_act"):
        assert inferred[field] == config[field], field
    if cls is CLIPTextModelWithProjection:
        assert inferred["projection_dim"] == config["projection_dim"]
    model = cls(CLIPTextConfig(**inferred))
    model.load_state_dict(convert(name, inferred, ldm, "ldm_to_diffusers"), strict=True)


def test_what_diffusers_cannot_hold_is_left_out():
    """SD2: diffusers' encoder stops a layer early and has no projection; logit_scale has no place."""
    config, state = build("sd2")
    ldm = convert("sd2", config, state, "diffusers_to_ldm")
    ldm.update({"logit_scale": torch.tensor(4.6), "text_projection": torch.randn(48, 48)})
    shorter = {**config, "num_hidden_layers": 2}
    plan = plan_for("openclip", shorter, ldm, "ldm_to_diffusers")
    dropped = dropped_keys(plan, ldm)
    assert sorted(dropped) == sorted(["logit_scale", "text_projection"] +
                                     [k for k in ldm if k.startswith("transformer.resblocks.2.")])
    out = convert_state_dict(plan, ldm)
    assert_identical(out, {k: v for k, v in state.items() if not k.startswith("encoder.layers.2.")})
    CLIPTextModel(CLIPTextConfig(**shorter)).load_state_dict(out, strict=True)


def test_layers_beyond_the_config_are_refused_from_diffusers():
    config, state = build("clip_l")
    with pytest.raises(SdkitError, match="encoder.layers.1"):
        plan_for("clip", {**config, "num_hidden_layers": 1}, state, "diffusers_to_ldm")
