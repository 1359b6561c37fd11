"""peft-trained LoRA / LoHa / LoKr / DoRA state dicts: sdkit's delta must equal peft's
own `get_delta_weight` (or its merged weight for DoRA), with alpha taken from the
adapter config, diffusers' `lora_adapter_metadata`, or the caller."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import (LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict,
                  inject_adapter_in_model)
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sdkit.adapters.lora_format import parse_lora
from sdkit.adapters.lora_math import delta_weight

pytestmark = pytest.mark.usefixtures("single_thread")

TARGETS = ["lin", "conv", "pw"]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 24)
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.pw = nn.Conv2d(8, 12, 1)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()


def adapted_model(config, seed: int = 0) -> nn.Module:
    """A tiny model with the adapter injected and every adapter parameter non-zero."""
    torch.manual_seed(seed)
    model = inject_adapter_in_model(config, Tiny())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "base_layer" not in name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval()


def layers(model: nn.Module) -> dict[str, nn.Module]:
    return {f"block.{name}": getattr(model.block, name) for name in TARGETS}


def assert_deltas_match_peft(model: nn.Module, parsed, strength: float = 1.0) -> None:
    assert set(parsed.modules) == set(layers(model))
    for name, layer in layers(model).items():
        with torch.no_grad():
            expected = layer.get_delta_weight("default") * strength
            ours, d_bias = delta_weight(parsed.modules[name], layer.base_layer.weight, strength)
        assert d_bias is None
        assert expected.abs().max() > 1e-2
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_lora_from_config(rslora):
    config = LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, use_rslora=rslora,
                        alpha_pattern={"conv": 2}, rank_pattern={"pw": 3})
    model = adapted_model(config)
    parsed = parse_lora(get_peft_model_state_dict(model), peft_config=config.to_dict())
    assert parsed.prefix_style == "peft"
    assert parsed.modules["block.conv"].alpha == 2 and parsed.modules["block.pw"].rank == 3
    assert_deltas_match_peft(model, parsed, strength=0.8)


def test_raw_state_dict_with_default_adapter_and_user_alpha():
    """`model.state_dict()` keeps peft's adapter name (`lora_A.default.weight`) and
    the base weights; alpha is given by the user."""
    config = LoraConfig(r=4, lora_alpha=10, target_modules=TARGETS)
    model = adapted_model(config)
    parsed = parse_lora(model.state_dict(), default_alpha=10)
    assert set(parsed.unrecognised) == {f"block.{n}.base_layer.{p}" for n in TARGETS
                                        for p in ("weight", "bias")}
    for key, reason in parsed.unrecognised.items():
        assert reason.startswith("a plain layer weight" if key.endswith("weight")
                                 else "unknown key suffix")
    assert_deltas_match_peft(model, parsed)


def lightning_checkpoint(model: nn.Module) -> dict:
    """What a DiffSynth-style Lightning run saves: peft keys with the adapter name under
    `state_dict`, no alpha, beside training state."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    return {"state_dict": weights, "epoch": 0, "global_step": 500,
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}]}


def test_lightning_checkpoint_with_rank_and_alpha_from_the_user(tmp_path):
    """The user says how it was trained (--rank 4 --alpha 6); read through sdkit.io."""
    from sdkit.io import open_model

    config = LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS)
    model = adapted_model(config)
    path = tmp_path / "epoch=0-step=500.ckpt"
    torch.save(lightning_checkpoint(model), path)
    with open_model(path) as checkpoint:
        parsed = parse_lora(checkpoint, default_alpha=6, rank_override=4)
        assert not parsed.unrecognised and parsed.path == str(path)
        assert_deltas_match_peft(model, parsed)
        without_alpha = parse_lora(checkpoint)
    assert {m.scale for m in without_alpha.modules.values()} == {1.0}


def test_lightning_checkpoint_as_a_nested_dict():
    config = LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS)
    model = adapted_model(config)
    parsed = parse_lora(lightning_checkpoint(model), default_alpha=6)
    assert parsed.unrecognised == {key: "outside the checkpoint's state_dict"
                                   for key in ("epoch", "global_step", "optimizer_states")}
    assert_deltas_match_peft(model, parsed)


def test_dora_matches_peft_merge():
    config = LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, use_dora=True)
    model = adapted_model(config)
    parsed = parse_lora(get_peft_model_state_dict(model), peft_config=config.to_dict())
    merged = copy.deepcopy(model)
    for name, layer in layers(merged).items():
        base = layer.base_layer.weight.detach().clone()
        layer.merge()
        assert parsed.modules[name].extra["dora_axis"] == "out"
        ours, _ = delta_weight(parsed.modules[name], base)
        torch.testing.assert_close(base + ours, layer.base_layer.weight.detach(),
                                   rtol=1e-5, atol=1e-6)
        half, _ = delta_weight(parsed.modules[name], base, 0.5)  # ComfyUI interpolation
        torch.testing.assert_close(half, ours * 0.5)


@pytest.mark.parametrize("tucker", [False, True], ids=["flat", "effective-conv2d"])
def test_loha_from_config(tucker):
    config = LoHaConfig(r=4, alpha=6, target_modules=TARGETS, use_effective_conv2d=tucker)
    model = adapted_model(config)
    parsed = parse_lora(get_peft_model_state_dict(model), peft_config=config.to_dict())
    assert ("t1" in parsed.modules["block.conv"].tensors) == tucker
    assert_deltas_match_peft(model, parsed, strength=1.3)


@pytest.mark.parametrize("options", [
    dict(r=2, decompose_both=False), dict(r=1, decompose_both=True, decompose_factor=4),
    dict(r=8, decompose_factor=4)], ids=["w2-factored", "both-factored", "full-factors"])
def test_lokr_from_config(options):
    """peft scales by alpha/r even when both Kronecker halves are full matrices."""
    config = LoKrConfig(alpha=3, target_modules=TARGETS, **options)
    model = adapted_model(config)
    parsed = parse_lora(get_peft_model_state_dict(model), peft_config=config.to_dict())
    assert_deltas_match_peft(model, parsed)


def test_lokr_full_factors_without_config_follow_lycoris():
    """Read as a LyCORIS file (no config), two full halves apply no alpha scaling."""
    config = LoKrConfig(r=8, alpha=3, decompose_factor=4, target_modules=TARGETS)
    model = adapted_model(config)
    state = get_peft_model_state_dict(model)
    assert not any(key.endswith(("w1_a", "w2_a")) for key in state)
    parsed = parse_lora({**state, **{f"block.{n}.alpha": torch.tensor(3.0) for n in TARGETS}})
    for name, layer in layers(model).items():
        expected = layer.get_delta_weight("default") / (3 / 8)
        ours, _ = delta_weight(parsed.modules[name], layer.base_layer.weight)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def unet_with_lora(unet: nn.Module, config: LoraConfig) -> nn.Module:
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return unet


def assert_unet_deltas(unet: nn.Module, parsed, prefix: str) -> None:
    lora_layers = {name: m for name, m in unet.named_modules() if hasattr(m, "lora_A")}
    assert set(parsed.modules) == {prefix + name for name in lora_layers}
    for name, layer in lora_layers.items():
        ours, _ = delta_weight(parsed.modules[prefix + name], layer.base_layer.weight)
        torch.testing.assert_close(ours, layer.get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-6)


def test_diffusers_pipeline_file_carries_alpha_in_metadata(tiny_unet, tmp_path):
    from diffusers import StableDiffusionPipeline

    config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet = unet_with_lora(tiny_unet, config)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=config.to_dict())
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["lora_adapter_metadata"])["unet.lora_alpha"] == 2
    parsed = parse_lora(load_file(path), metadata)
    assert parsed.prefix_style == "diffusers"
    assert {m.scale for m in parsed.modules.values()} == {0.5}
    assert_unet_deltas(unet, parsed, "unet.")


def test_diffusers_model_file_carries_alpha_in_metadata(tiny_unet, tmp_path):
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "proj_in"], use_rslora=True)
    unet = unet_with_lora(tiny_unet, config)
    unet.save_lora_adapter(tmp_path)
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    parsed = parse_lora(load_file(path), metadata)
    assert {m.scale for m in parsed.modules.values()} == {6.0}
    assert_unet_deltas(unet, parsed, "")
