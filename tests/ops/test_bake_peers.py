"""Baking checked against the peers: diffusers' `load_lora_weights` + `fuse_lora` for peft
LoRAs (onto a diffusers folder and onto the same model as an LDM single file), and the
LyCORIS forward pass for LoCon / LoHa / LoKr files LyCORIS itself saved."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from sdkit.ops.lora.bake import AdapterInput, bake_loras
from test_convert_support import stored
from test_lora_support import single_thread  # noqa: F401  (autouse)
from test_lora_support import (diffusers_state, ldm_to_diffusers, peft_lora_file, read_folder, save_folder,
                               save_ldm, tiny_pipeline)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("sd1")
    pipe = tiny_pipeline("sd1")
    return {"pipe": pipe, "folder": save_folder(pipe, folder / "base"),
            "single": save_ldm(pipe, folder / "base.safetensors"),
            "lora": peft_lora_file(pipe, folder / "lora")}


def fused(pipe, lora: Path, strength: float) -> dict[str, torch.Tensor]:
    """What diffusers makes of the adapter: the pipeline's weights after fuse_lora."""
    fused_pipe = copy.deepcopy(pipe)
    fused_pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    fused_pipe.fuse_lora(lora_scale=strength)
    fused_pipe.unload_lora_weights()
    return diffusers_state(fused_pipe)


def assert_matches(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                   original: dict[str, torch.Tensor]) -> None:
    # a written folder keeps text encoder weights under `text_model.` (transformers 4, ComfyUI)
    ours, expected, original = stored(ours), stored(expected), stored(original)
    assert set(ours) >= {k for k in expected if not k.startswith("vae/")}
    changed = 0
    for key, value in expected.items():
        if key in ours:
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)
            changed += not torch.equal(value, original[key])
    assert changed >= 40  # the UNet attention and text-encoder layers the adapter targets


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_bake_into_diffusers_folder_equals_fuse_lora(sd1, strength, tmp_path):
    output = tmp_path / "baked"
    result = bake_loras(sd1["folder"], [AdapterInput(str(sd1["lora"]), strength)], output)
    assert result.convention == "diffusers"
    report = result.adapters[0]
    assert report.mapped == report.modules and not report.unmapped
    assert set(report.by_component) == {"unet", "text_encoder"}
    assert_matches(read_folder(output), fused(sd1["pipe"], sd1["lora"], strength),
                   diffusers_state(sd1["pipe"]))


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_bake_into_single_file_equals_fuse_lora(sd1, strength, tmp_path):
    output = tmp_path / "baked.safetensors"
    result = bake_loras(sd1["single"], [AdapterInput(str(sd1["lora"]), strength)], output)
    assert result.convention == "ldm"
    baked = load_file(str(output))
    assert set(baked) == set(load_file(str(sd1["single"])))
    assert_matches(ldm_to_diffusers(baked, sd1["pipe"]), fused(sd1["pipe"], sd1["lora"], strength),
                   diffusers_state(sd1["pipe"]))


# ---- LyCORIS ------------------------------------------------------------------------------

UNET_BLOCKS = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
ALGORITHMS = [
    ("locon", dict(lora_dim=4, alpha=2, conv_lora_dim=3, conv_alpha=1.5)),
    ("loha", dict(lora_dim=4, alpha=2, conv_lora_dim=4, conv_alpha=1)),
    ("lokr", dict(lora_dim=2, alpha=3, conv_lora_dim=2, conv_alpha=1)),
]


@pytest.fixture
def lycoris_network():
    """Factory of kohya-named LyCORIS networks with random weights (LyCORIS keeps its preset
    in class attributes: restored afterwards)."""
    from lycoris.logging import logger
    from lycoris.wrapper import LycorisNetwork

    attrs = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX",
             "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {attr: getattr(LycorisNetwork, attr) for attr in attrs}
    logger.setLevel(logging.ERROR)

    def build(unet: nn.Module, algo: str, strength: float, **kwargs):
        LycorisNetwork.apply_preset({
            "enable_conv": True, "target_module": UNET_BLOCKS, "target_name": [], "module_algo_map": {},
            "name_algo_map": {}, "lora_prefix": "lora_unet", "use_fnmatch": False, "exclude_name": []})
        network = LycorisNetwork(unet, multiplier=strength, network_module=algo, **kwargs)
        layers = {m.lora_name: m.org_module[0] for m in network.loras}
        originals = {name: (layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
                     for name, layer in layers.items()}
        network.apply_to()
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        return network.eval(), {m.lora_name: m for m in network.loras}, originals

    yield build
    for attr, value in saved.items():
        setattr(LycorisNetwork, attr, value)


def _run(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)


def _input(layer: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if isinstance(layer, nn.Linear):
        return torch.randn(3, layer.in_features, generator=generator)
    return torch.randn(2, layer.in_channels, 6, 6, generator=generator)


@pytest.mark.parametrize("algo,kwargs", ALGORITHMS, ids=[a for a, _ in ALGORITHMS])
def test_lycoris_files_bake_like_the_lycoris_forward(algo, kwargs, lycoris_network, tmp_path):
    strength = 0.8
    pipe = tiny_pipeline("sd1")
    base = save_folder(pipe, tmp_path / "base")
    network, modules, originals = lycoris_network(copy.deepcopy(pipe.unet), algo, strength, **kwargs)
    lora = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(lora), torch.float32, {"ss_network_module": "lycoris.kohya"})
    result = bake_loras(base, [AdapterInput(str(lora), strength)], tmp_path / "baked")
    assert result.adapters[0].mapped == len(modules) and not result.adapters[0].unmapped
    baked = read_folder(tmp_path / "baked")
    names = {name: path for path, name in ((p, "lora_unet_" + p.replace(".", "_"))
                                           for p, _ in pipe.unet.named_modules())}
    for lora_name, module in modules.items():
        layer = module.org_module[0]
        key = f"unet/{names[lora_name]}"
        weight, bias = baked[f"{key}.weight"], baked.get(f"{key}.bias")
        x = _input(layer)
        with torch.no_grad():
            expected = module(x)
            ours = _run(layer, x, weight, bias)
            untouched = _run(layer, x, *originals[lora_name])
        effect = float((untouched - expected).norm() / expected.norm())
        error = float((ours - expected).norm() / expected.norm())
        assert effect > 1e-3, f"{lora_name}: the adapter barely changes the output"
        assert error < 1e-5, f"{lora_name}: {error:.2e}"
