"""Shared fixtures for the LoRA-family tests: a tiny SD-style UNet, LyCORIS networks
built on it with non-zero weights, and an output comparison of one adapted layer."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdkit.adapters.lora_format import LoraModule
from sdkit.adapters.lora_math import delta_weight

UNET_BLOCKS = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]


@pytest.fixture
def single_thread():
    """Tiny tensors: one thread is many times faster than several contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def unet_template() -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        norm_num_groups=8, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    with torch.no_grad():  # non-trivial norm weights so norm deltas are visible
        for module in unet.modules():
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
                module.weight.add_(torch.randn_like(module.weight) * 0.1)
    return unet.eval()


@pytest.fixture
def tiny_unet(unet_template: nn.Module) -> nn.Module:
    """A fresh copy per test: LyCORIS rewires the layers it adapts."""
    return copy.deepcopy(unet_template)


@dataclass
class AdaptedLayer:
    """One LyCORIS module with a snapshot of its layer's weights before adaptation."""

    lycoris_module: nn.Module
    layer: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None


def snapshot_layers(network: nn.Module) -> dict[str, AdaptedLayer]:
    """Each module of a LyCORIS network that is not applied yet, with its layer's weights."""
    layers = {}
    for module in network.loras:
        layer = module.org_module[0]
        bias = getattr(layer, "bias", None)
        layers[module.lora_name] = AdaptedLayer(
            module, layer, layer.weight.detach().clone(),
            None if bias is None else bias.detach().clone())
    return layers


@pytest.fixture
def lycoris_network(tiny_unet: nn.Module) -> Callable[..., tuple[nn.Module, dict[str, AdaptedLayer]]]:
    """Factory: a kohya-named LyCORIS network on the tiny UNet with random weights.

    LyCORIS keeps its preset in class attributes; they are set before each build and
    restored afterwards so tests do not leak into each other.
    """
    from lycoris.logging import logger
    from lycoris.wrapper import LycorisNetwork

    attrs = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX",
             "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {attr: getattr(LycorisNetwork, attr) for attr in attrs}
    logger.setLevel(logging.ERROR)

    def build(algo: str, *, seed: int = 1, noise: float = 0.05, **kwargs):
        LycorisNetwork.apply_preset({
            "enable_conv": True, "target_module": UNET_BLOCKS, "target_name": [],
            "module_algo_map": {}, "name_algo_map": {}, "lora_prefix": "lora_unet",
            "use_fnmatch": False, "exclude_name": []})
        network = LycorisNetwork(tiny_unet, network_module=algo, **kwargs)
        layers = snapshot_layers(network)
        network.apply_to()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
        return network.eval(), layers

    yield build
    for attr, value in saved.items():
        setattr(LycorisNetwork, attr, value)


def layer_input(layer: nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(3, layer.in_features, generator=generator)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 6, 6, generator=generator)
    if isinstance(layer, nn.GroupNorm):
        return torch.randn(2, layer.num_channels, 4, 4, generator=generator)
    if isinstance(layer, nn.LayerNorm):
        return torch.randn(3, *layer.normalized_shape, generator=generator)
    raise TypeError(type(layer).__name__)


def run_layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """The layer's own operation with the given parameters."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, bias)
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, weight, bias, layer.eps)
    return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def compare_with_forward(adapted: AdaptedLayer, module: LoraModule, strength: float,
                         seed: int = 0) -> tuple[float, float]:
    """(relative error of our merged layer vs the LyCORIS forward, relative size of the
    adapter's effect on that output)."""
    x = layer_input(adapted.layer, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = adapted.lycoris_module(x)
        d_weight, d_bias = delta_weight(module, adapted.weight, strength)
        bias = adapted.bias
        if d_bias is not None:
            bias = d_bias if bias is None else bias + d_bias
        ours = run_layer(adapted.layer, x, adapted.weight + d_weight, bias)
        base = run_layer(adapted.layer, x, adapted.weight, adapted.bias)
    return relative_error(ours, expected), relative_error(base, expected)


@pytest.fixture
def snapshot() -> Callable[[nn.Module], dict[str, AdaptedLayer]]:
    return snapshot_layers


@pytest.fixture
def forward_check() -> Callable[[AdaptedLayer, LoraModule, float], tuple[float, float]]:
    return compare_with_forward
