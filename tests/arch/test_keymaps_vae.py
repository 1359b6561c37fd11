"""VAE maps against diffusers' AutoencoderKL and its single-file loader.

A toy two-level VAE and the real SD VAE structure (four levels, two resnets per level,
mid attention) at reduced width.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from sdkit.arch.keymaps import convert_state_dict, dropped_keys, infer_vae_config_from_ldm, plan_for, vae_plan
from sdkit.errors import SdkitError

CONFIGS = {
    "toy": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    "sd": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
}
LOADING_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                  "down_block_types", "up_block_types")


@lru_cache(maxsize=None)
def build(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = AutoencoderKL(**CONFIGS[name])
    state = {key: torch.randn(value.shape) for key, value in model.state_dict().items()}
    return dict(model.config), state


def convert(config: dict, state: dict[str, torch.Tensor], direction: str) -> dict[str, torch.Tensor]:
    return convert_state_dict(plan_for("vae", config, state, direction), state)


def plain(value):
    """Config values compare alike whether stored as tuples or lists."""
    return list(value) if isinstance(value, (list, tuple)) else value


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    unequal = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not unequal, unequal[:5]


@pytest.mark.parametrize("name", CONFIGS)
def test_full_plan_covers_exactly_the_model_tensors(name):
    config, state = build(name)
    assert sorted(vae_plan(config, "ldm_to_diffusers")) == sorted(state)


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trips_are_bit_identical(name):
    config, state = build(name)
    ldm = convert(config, state, "diffusers_to_ldm")
    assert_identical(convert(config, ldm, "ldm_to_diffusers"), state)
    assert_identical(convert(config, convert(config, ldm, "ldm_to_diffusers"), "diffusers_to_ldm"), ldm)


@pytest.mark.parametrize("name", CONFIGS)
def test_ldm_layout_places(name):
    config, state = build(name)
    ldm = convert(config, state, "diffusers_to_ldm")
    levels = len(config["block_out_channels"])
    assert ldm["encoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)
    assert torch.equal(ldm["encoder.mid.attn_1.proj_out.weight"][:, :, 0, 0],
                       state["encoder.mid_block.attentions.0.to_out.0.weight"])
    # the decoder's first diffusers level is LDM's last
    assert torch.equal(ldm[f"decoder.up.{levels - 1}.block.0.conv1.weight"], state["decoder.up_blocks.0.resnets.0.conv1.weight"])
    assert torch.equal(ldm[f"decoder.up.{levels - 1}.upsample.conv.weight"],
                       state["decoder.up_blocks.0.upsamplers.0.conv.weight"])
    assert "decoder.up.0.upsample.conv.weight" not in ldm and f"encoder.down.{levels - 1}.downsample.conv.weight" not in ldm
    assert torch.equal(ldm["encoder.down.1.block.0.nin_shortcut.weight"],
                       state["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"])


@pytest.mark.parametrize("name", CONFIGS)
def test_diffusers_own_ldm_conversion_agrees(name):
    config, state = build(name)
    ldm = convert(config, state, "diffusers_to_ldm")
    theirs = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm.items()}, config)
    assert_identical(theirs, convert(config, ldm, "ldm_to_diffusers"))


@pytest.mark.parametrize("name", CONFIGS)
def test_single_file_loads_back_through_diffusers(name, tmp_path):
    config, state = build(name)
    path = tmp_path / "vae.safetensors"
    save_file(convert(config, state, "diffusers_to_ldm"), path)
    AutoencoderKL(**CONFIGS[name]).save_config(tmp_path / "config")
    loaded = AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "config"), local_files_only=True)
    assert_identical(loaded.state_dict(), state)


@pytest.mark.parametrize("name", CONFIGS)
def test_inferred_config_loads_the_converted_weights(name):
    config, state = build(name)
    ldm = convert(config, state, "diffusers_to_ldm")
    inferred = infer_vae_config_from_ldm({f"first_stage_model.{k}": v.shape for k, v in ldm.items()},
                                         "first_stage_model.")
    model = AutoencoderKL.from_config(inferred)
    for field in LOADING_FIELDS:
        assert plain(model.config[field]) == plain(config[field]), field
    model.load_state_dict(convert(inferred, ldm, "ldm_to_diffusers"), strict=True)


def test_legacy_diffusers_attention_names_are_accepted():
    config, state = build("toy")
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state.items():
        for new, old in legacy_names.items():
            key = key.replace(f"mid_block.attentions.0.{new}.", f"mid_block.attentions.0.{old}.")
        legacy[key] = value
    assert legacy.keys() != state.keys()
    assert_identical(convert(config, legacy, "diffusers_to_ldm"), convert(config, state, "diffusers_to_ldm"))


def test_linear_shaped_ldm_attention_and_training_leftovers():
    config, state = build("toy")
    ldm = convert(config, state, "diffusers_to_ldm")
    squeezed = {k: v[:, :, 0, 0] if ".attn_1." in k and v.ndim == 4 else v for k, v in ldm.items()}
    squeezed["loss.logvar"] = torch.zeros(())
    plan = plan_for("vae", config, squeezed, "ldm_to_diffusers")
    assert dropped_keys(plan, squeezed) == ["loss.logvar"]
    assert_identical(convert_state_dict(plan, squeezed), state)


def test_stray_key_is_refused():
    config, state = build("toy")
    ldm = convert(config, state, "diffusers_to_ldm")
    ldm["decoder.up.7.block.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(SdkitError, match="decoder.up.7"):
        plan_for("vae", config, ldm, "ldm_to_diffusers")
