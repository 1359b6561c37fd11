"""UNet: diffusers `UNet2DConditionModel` ⇄ LDM `UNetModel` (`model.diffusion_model.*`).

The LDM layout numbers its blocks in one running sequence:
- `input_blocks.0.0` is conv_in; then, level by level, one input block per resnet
  (`.0` the resnet, `.1` its transformer when the level has attention) and, on every level
  but the last, one more block whose `.0.op` is the downsampler;
- `middle_block.0/.1/.2` = resnet, transformer, resnet;
- `output_blocks.*` run through the up levels (diffusers `up_blocks`, deepest first), one
  block per resnet (`.0` resnet, `.1` transformer when the level has attention); the last
  block of every level but the final one also holds the upsampler, at `.2.conv` when the
  level has attention and `.1.conv` when it has none.
Counts come from the config (levels, layers per block, transformer depth per layer), so
two-level toy UNets and SDXL's three levels go through the same code as SD1.5's four.
Inside a transformer the two layouts use the same names.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from sdkit.arch.keymaps.recipe import KeyPlan, KeyRules, Link, plan_from_keys, plan_from_links
from sdkit.errors import SdkitError

# UNet2DConditionModel's defaults for the fields the map reads
_DEFAULTS: dict[str, Any] = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
}
# config values that add modules the LDM layout has no place for
_UNSUPPORTED: dict[str, Any] = {
    "time_cond_proj_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "attention_type": "default", "time_embedding_type": "positional",
}
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}

_RESNET_LEAVES = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                  ("norm2", "out_layers.0"), ("conv2", "out_layers.3"))
_SHORTCUT_LEAF = ("conv_shortcut", "skip_connection")
_BLOCK_LEAVES = ("norm1", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "norm2",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "norm3",
                 "ff.net.0.proj", "ff.net.2")
_NO_BIAS = ("to_q", "to_k", "to_v")


def _setting(config: Mapping[str, Any], name: str) -> Any:
    return config.get(name, _DEFAULTS[name])


def _per_level(value: Any, levels: int, name: str) -> list[Any]:
    if isinstance(value, int):
        return [value] * levels
    values = list(value)
    if len(values) != levels:
        raise SdkitError(f"unet config: {name} has {len(values)} entries for {levels} levels")
    return values


def _depth(entry: int | list[int], layer: int) -> int:
    """Transformer depth of one layer: a level's entry is one depth or one per layer."""
    return entry if isinstance(entry, int) else entry[layer]


def _check_supported(config: Mapping[str, Any]) -> None:
    for name, plain in _UNSUPPORTED.items():
        if config.get(name, plain) not in (plain, None):
            raise SdkitError(f"unet config: {name}={config[name]!r} has no LDM single-file layout")
    if _setting(config, "mid_block_type") != "UNetMidBlock2DCrossAttn":
        raise SdkitError(f"unet config: mid_block_type {config['mid_block_type']!r} has no LDM layout")
    if _setting(config, "addition_embed_type") not in (None, "text_time"):
        raise SdkitError(f"unet config: addition_embed_type {config['addition_embed_type']!r} is not supported")
    if _setting(config, "class_embed_type") not in (None, "projection", "timestep"):
        raise SdkitError(f"unet config: class_embed_type {config['class_embed_type']!r} is not supported")
    for name, known in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
        for block_type in _setting(config, name):
            if block_type not in known:
                raise SdkitError(f"unet config: {name} entry {block_type!r} is not supported")


class _LinkList:
    """Collects the links of a UNet module by module."""

    def __init__(self) -> None:
        self.links: list[Link] = []

    def params(self, diffusers: str, ldm: str, leaves: Iterable[tuple[str, str]] = (("", ""),),
               bias: bool = True) -> None:
        for d_leaf, l_leaf in leaves:
            names = ("weight", "bias") if bias and not d_leaf.rstrip(".").endswith(_NO_BIAS) else ("weight",)
            for name in names:
                self.links.append(Link((f"{diffusers}{d_leaf}{name}",), (f"{ldm}{l_leaf}{name}",)))

    def resnet(self, diffusers: str, ldm: str, shortcut: bool) -> None:
        leaves = _RESNET_LEAVES + ((_SHORTCUT_LEAF,) if shortcut else ())
        self.params(diffusers, ldm, [(f"{d}.", f"{l}.") for d, l in leaves])

    def transformer(self, diffusers: str, ldm: str, depth: int) -> None:
        leaves = ["norm.", "proj_in."]
        leaves += [f"transformer_blocks.{t}.{leaf}." for t in range(depth) for leaf in _BLOCK_LEAVES]
        leaves.append("proj_out.")
        self.params(diffusers, ldm, [(leaf, leaf) for leaf in leaves])


def unet_links(config: Mapping[str, Any]) -> list[Link]:
    """Every tensor place of the UNet that `config` describes, in both layouts."""
    _check_supported(config)
    out = _LinkList()
    out.params("conv_in.", "input_blocks.0.0.")
    out.params("time_embedding.linear_1.", "time_embed.0.")
    out.params("time_embedding.linear_2.", "time_embed.2.")
    _label_embedding(config, out)
    depths = _down_blocks(config, out)
    out.resnet("mid_block.resnets.0.", "middle_block.0.", shortcut=False)
    out.transformer("mid_block.attentions.0.", "middle_block.1.", _depth(depths[-1], 0))
    out.resnet("mid_block.resnets.1.", "middle_block.2.", shortcut=False)
    _up_blocks(config, depths, out)
    out.params("conv_norm_out.", "out.0.")
    out.params("conv_out.", "out.2.")
    return out.links


def _label_embedding(config: Mapping[str, Any], out: _LinkList) -> None:
    # SDXL's text_time embedding and a projection class embedding both sit at label_emb.0
    for name, enabled in (("add_embedding", _setting(config, "addition_embed_type") == "text_time"),
                          ("class_embedding", _setting(config, "class_embed_type") is not None)):
        if enabled:
            out.params(f"{name}.linear_1.", "label_emb.0.0.")
            out.params(f"{name}.linear_2.", "label_emb.0.2.")
    if _setting(config, "num_class_embeds") is not None:
        out.params("class_embedding.", "label_emb.", bias=False)


def _down_blocks(config: Mapping[str, Any], out: _LinkList) -> list[Any]:
    """Links of the down path; returns the per-level transformer depths."""
    types = list(_setting(config, "down_block_types"))
    levels = len(types)
    channels = _per_level(_setting(config, "block_out_channels"), levels, "block_out_channels")
    layers = _per_level(_setting(config, "layers_per_block"), levels, "layers_per_block")
    depths = _per_level(_setting(config, "transformer_layers_per_block"), levels, "transformer_layers_per_block")
    block, width = 1, channels[0]
    for level, block_type in enumerate(types):
        for layer in range(layers[level]):
            out.resnet(f"down_blocks.{level}.resnets.{layer}.", f"input_blocks.{block}.0.",
                       shortcut=width != channels[level])
            width = channels[level]
            if _DOWN_TYPES[block_type]:
                out.transformer(f"down_blocks.{level}.attentions.{layer}.", f"input_blocks.{block}.1.",
                                _depth(depths[level], layer))
            block += 1
        if level < levels - 1:
            out.params(f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{block}.0.op.")
            block += 1
    return depths


def _up_blocks(config: Mapping[str, Any], down_depths: list[Any], out: _LinkList) -> None:
    types = list(_setting(config, "up_block_types"))
    levels = len(types)
    layers = _per_level(_setting(config, "layers_per_block"), levels, "layers_per_block")[::-1]
    reverse = _setting(config, "reverse_transformer_layers_per_block")
    depths = down_depths[::-1] if reverse is None else _per_level(
        reverse, levels, "reverse_transformer_layers_per_block")
    block = 0
    for level, block_type in enumerate(types):
        attention = _UP_TYPES[block_type]
        count = layers[level] + 1
        for layer in range(count):
            # up resnets read their input concatenated with a skip connection, so their
            # input is always wider than their output: each has a shortcut conv
            out.resnet(f"up_blocks.{level}.resnets.{layer}.", f"output_blocks.{block}.0.", shortcut=True)
            if attention:
                out.transformer(f"up_blocks.{level}.attentions.{layer}.", f"output_blocks.{block}.1.",
                                _depth(depths[level], layer))
            if layer == count - 1 and level < levels - 1:
                slot = 2 if attention else 1
                out.params(f"up_blocks.{level}.upsamplers.0.conv.", f"output_blocks.{block}.{slot}.conv.")
            block += 1


def unet_plan(config: Mapping[str, Any], direction: str) -> KeyPlan:
    """The plan for every tensor of the UNet described by `config` (a diffusers config)."""
    return plan_from_links(unet_links(config), direction)


def unet_plan_for_keys(config: Mapping[str, Any], keys: Iterable[str], direction: str) -> KeyPlan:
    return plan_from_keys(unet_links(config), direction, keys, KeyRules("unet"))
