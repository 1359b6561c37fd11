"""Which layers a LoRA / LoHa / LoKr trains: kohya's `networks.lora` set or a LyCORIS preset.

kohya (networks/lora.py `LoRANetwork`) adapts every Linear and 1x1 Conv2d inside the
UNet's `Transformer2DModel` blocks (attention, proj_in / proj_out, feed-forward) and the
text encoders' `CLIPAttention` / `CLIPMLP`; with `conv_dim` it adds `ResnetBlock2D`,
`Downsample2D` and `Upsample2D`, their 3x3 convolutions at `conv_dim` / `conv_alpha`
(LoCon) and their Linear / 1x1 layers at the network rank.

LyCORIS presets (lycoris/config.py) name container classes and layer names the same way:
`full` (transformers, ResNet blocks, samplers, conv_in / conv_out and the time
embedding), `attn-mlp` (kohya's set and the time embedding), `attn-only` (attention modules — LyCORIS names
them by the old diffusers class names `CrossAttention` / `SelfAttention`, today's
`Attention`), `unet-transformer-only`, `unet-convblock-only` (ResNet blocks, samplers,
conv_in / conv_out). Within them 3x3 convolutions are trained only with a conv rank, as
LyCORIS's `create_single_module` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TRANSFORMERS = ("Transformer2DModel",)
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
DEFAULT_CONV_ALPHA = 1.0  # kohya's conv_alpha default


@dataclass(frozen=True)
class Preset:
    unet_blocks: tuple[str, ...]
    unet_names: tuple[str, ...] = ()
    text_blocks: tuple[str, ...] = TEXT_BLOCKS
    conv: bool = False  # 3x3 convolutions allowed (with a conv rank)


KOHYA = Preset(TRANSFORMERS)
# LyCORIS lists `TimestepEmbedding` (for another model) beside the transformer blocks, so on
# an SD UNet its presets also take the time embedding's two Linear layers
_LYCORIS_TRANSFORMERS = TRANSFORMERS + ("TimestepEmbedding",)
PRESETS = {
    "full": Preset(_LYCORIS_TRANSFORMERS + CONV_BLOCKS, ("conv_in", "conv_out", "time_embedding.linear_1",
                                                         "time_embedding.linear_2"), conv=True),
    "attn-mlp": Preset(_LYCORIS_TRANSFORMERS),
    "attn-only": Preset(("Attention",), text_blocks=("CLIPAttention", "CLIPSdpaAttention")),
    "unet-transformer-only": Preset(_LYCORIS_TRANSFORMERS, text_blocks=()),
    "unet-convblock-only": Preset(CONV_BLOCKS, ("conv_in", "conv_out"), text_blocks=(), conv=True),
}


def preset_of(method: str, preset: str | None, conv_dim: int | None) -> Preset:
    """kohya's set (plus its conv blocks with a conv rank), or the named LyCORIS preset."""
    if preset is not None:
        return PRESETS[preset]
    if conv_dim is not None:
        return Preset(TRANSFORMERS + CONV_BLOCKS, conv=True)
    return KOHYA


def _adaptable(layer: torch.nn.Module, conv: bool) -> str | None:
    """"linear" (Linear, 1x1 conv), "conv" (a larger conv, when allowed) or None."""
    if isinstance(layer, torch.nn.Linear):
        return "linear"
    if isinstance(layer, torch.nn.Conv2d):
        return "linear" if layer.kernel_size == (1, 1) else ("conv" if conv else None)
    return None


def layer_targets(root: torch.nn.Module, component: str, preset: Preset,
                  conv: bool) -> tuple[list[str], list[str]]:
    """(linear-rank layer paths, conv-rank layer paths) of `root`; `conv`: a conv rank is set."""
    blocks = preset.unet_blocks if component == "unet" else preset.text_blocks
    names = preset.unet_names if component == "unet" else ()
    allow_conv = conv and preset.conv
    linear: dict[str, None] = {}
    convs: dict[str, None] = {}
    for path, module in root.named_modules():
        inside = [(f"{path}.{child}" if child else path, layer) for child, layer in module.named_modules()] \
            if module.__class__.__name__ in blocks else []
        if path in names:
            inside.append((path, module))
        for name, layer in inside:
            kind = _adaptable(layer, allow_conv)
            if kind is not None:
                (linear if kind == "linear" else convs)[name] = None
    return list(linear), [name for name in convs if name not in linear]
