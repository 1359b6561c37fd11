"""A1111 hypernetworks: key / value MLPs on every attention context, trained in place.

The hypernetwork gets one (key, value) MLP pair per context width the UNet's attention
layers see — each level's hidden width (self-attention) and the text width
(cross-attention), which is what A1111's default sizes 320/640/1280/768 are for SD 1.x.
It is built and initialised by `sdkit.adapters.hypernet.new_hypernetwork` with the
layer structure, activation, layer-norm and dropout options, attached through
`sdkit.runtime.hypernet_attn` in training mode (dropout on, strength 1, as in A1111),
and written as A1111's `.pt` by `save_hypernetwork`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdkit.adapters.hypernet import Hypernetwork, HypernetworkSettings, new_hypernetwork, save_hypernetwork
from sdkit.runtime.hypernet_attn import attach_hypernetwork
from sdkit.runtime.train.methods.base import SaveContext, TrainingMethod


def context_widths(unet: nn.Module) -> list[int]:
    """Every width an attention layer of `unet` feeds to its to_k / to_v."""
    from diffusers.models.attention_processor import Attention

    return sorted({module.to_k.in_features for module in unet.modules() if isinstance(module, Attention)})


class HypernetMethod(TrainingMethod):
    name = "hypernet"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hypernetwork: Hypernetwork | None = None
        self._modules: nn.ModuleDict | None = None

    def settings(self) -> HypernetworkSettings:
        options = self.config.hypernet
        return HypernetworkSettings(layer_structure=tuple(options.layer_structure),
                                    activation_func=options.activation, add_layer_norm=options.layer_norm,
                                    use_dropout=options.dropout, weight_init=options.weight_init)

    def setup(self, generator: torch.Generator) -> None:
        unet = self.pipe.unet
        hypernetwork = new_hypernetwork(self.config.stem.name, context_widths(unet), self.settings(), generator)
        hypernetwork.train()
        attach_hypernetwork(unet, hypernetwork)
        self.hypernetwork = hypernetwork
        self._modules = nn.ModuleDict({f"{width}_{role}": module for width, pair in hypernetwork.layers.items()
                                       for role, module in zip(("k", "v"), pair)})

    def extra_module(self) -> nn.Module | None:
        return self._modules

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.hypernetwork.parameters(), "lr": self.config.optim.lr}]

    def save(self, context: SaveContext) -> list[Path]:
        hypernetwork = self.hypernetwork
        hypernetwork.step = context.steps
        hypernetwork.sd_checkpoint = context.base_short_hash
        hypernetwork.sd_checkpoint_name = self.model.name
        return [save_hypernetwork(context.path, hypernetwork, overwrite=context.overwrite)]
