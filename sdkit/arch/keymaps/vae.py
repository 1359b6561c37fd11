"""VAE: diffusers `AutoencoderKL` ⇄ LDM `AutoencoderKL` (`first_stage_model.*`, VAE files).

- encoder `down_blocks.{i}.resnets.{j}` ⇄ `down.{i}.block.{j}`, `downsamplers.0.conv` ⇄
  `down.{i}.downsample.conv`; decoder `up_blocks.{k}` ⇄ `up.{levels-1-k}` (LDM numbers the
  decoder levels from the smallest resolution's opposite end), `upsamplers.0.conv` ⇄
  `upsample.conv`;
- resnets: same names except `conv_shortcut` ⇄ `nin_shortcut`;
- mid block: `resnets.0/1` ⇄ `block_1/2`, `attentions.0` ⇄ `attn_1` with `group_norm` ⇄
  `norm`, `to_q/to_k/to_v/to_out.0` (Linear [C, C]) ⇄ `q/k/v/proj_out` (1×1 conv
  [C, C, 1, 1]); older diffusers files spell them `query/key/value/proj_attn` (accepted);
- `conv_norm_out` ⇄ `norm_out`; conv_in, conv_out, quant_conv, post_quant_conv unchanged.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from sdkit.arch.keymaps.recipe import KeyPlan, KeyRules, Link, plan_from_keys, plan_from_links
from sdkit.errors import SdkitError

_DEFAULTS: dict[str, Any] = {
    "block_out_channels": (64,), "layers_per_block": 1, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}
_RESNET_LEAVES = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
_SHORTCUT_LEAF = ("conv_shortcut", "nin_shortcut")
_ATTENTION_LEAVES = (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_TRAINING_LEFTOVERS = ("loss.", "model_ema.")  # discriminator and EMA bookkeeping of VAE training


def _setting(config: Mapping[str, Any], name: str) -> Any:
    return config.get(name, _DEFAULTS[name])


class _VaeLinks:
    def __init__(self, channels: list[int], layers: int) -> None:
        self.channels = channels
        self.layers = layers
        self.links: list[Link] = []

    def params(self, diffusers: str, ldm: str) -> None:
        for name in ("weight", "bias"):
            self.links.append(Link((f"{diffusers}{name}",), (f"{ldm}{name}",)))

    def resnet(self, diffusers: str, ldm: str, shortcut: bool) -> None:
        for d_leaf, l_leaf in _RESNET_LEAVES + ((_SHORTCUT_LEAF,) if shortcut else ()):
            self.params(f"{diffusers}{d_leaf}.", f"{ldm}{l_leaf}.")

    def mid_block(self, side: str, attention: bool) -> None:
        self.resnet(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", shortcut=False)
        if attention:
            self.params(f"{side}.mid_block.attentions.0.group_norm.", f"{side}.mid.attn_1.norm.")
            width = self.channels[-1]
            for d_leaf, l_leaf in _ATTENTION_LEAVES:
                d_name = f"{side}.mid_block.attentions.0.{d_leaf}."
                l_name = f"{side}.mid.attn_1.{l_leaf}."
                self.links.append(Link((d_name + "weight",), (l_name + "weight",), "conv1x1", width))
                self.links.append(Link((d_name + "bias",), (l_name + "bias",)))
        self.resnet(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", shortcut=False)

    def encoder(self, attention: bool) -> None:
        self.params("encoder.conv_in.", "encoder.conv_in.")
        width = self.channels[0]
        for level, channels in enumerate(self.channels):
            for layer in range(self.layers):
                self.resnet(f"encoder.down_blocks.{level}.resnets.{layer}.", f"encoder.down.{level}.block.{layer}.",
                            shortcut=width != channels)
                width = channels
            if level < len(self.channels) - 1:
                self.params(f"encoder.down_blocks.{level}.downsamplers.0.conv.",
                            f"encoder.down.{level}.downsample.conv.")
        self.mid_block("encoder", attention)
        self.params("encoder.conv_norm_out.", "encoder.norm_out.")
        self.params("encoder.conv_out.", "encoder.conv_out.")

    def decoder(self, attention: bool) -> None:
        self.params("decoder.conv_in.", "decoder.conv_in.")
        self.mid_block("decoder", attention)
        levels = len(self.channels)
        reversed_channels = self.channels[::-1]
        width = reversed_channels[0]
        for level, channels in enumerate(reversed_channels):
            ldm_level = levels - 1 - level
            for layer in range(self.layers + 1):
                self.resnet(f"decoder.up_blocks.{level}.resnets.{layer}.", f"decoder.up.{ldm_level}.block.{layer}.",
                            shortcut=width != channels)
                width = channels
            if level < levels - 1:
                self.params(f"decoder.up_blocks.{level}.upsamplers.0.conv.", f"decoder.up.{ldm_level}.upsample.conv.")
        self.params("decoder.conv_norm_out.", "decoder.norm_out.")
        self.params("decoder.conv_out.", "decoder.conv_out.")


def vae_links(config: Mapping[str, Any]) -> list[Link]:
    """Every tensor place of the AutoencoderKL that `config` describes, in both layouts."""
    channels = list(_setting(config, "block_out_channels"))
    layers = _setting(config, "layers_per_block")
    if not isinstance(layers, int):
        raise SdkitError("vae config: layers_per_block must be one number")
    for name in ("down_block_types", "up_block_types"):
        if len(config.get(name, channels)) != len(channels):
            raise SdkitError(f"vae config: {name} and block_out_channels differ in length")
    attention = bool(_setting(config, "mid_block_add_attention"))
    out = _VaeLinks(channels, layers)
    out.encoder(attention)
    out.decoder(attention)
    if _setting(config, "use_quant_conv"):
        out.params("quant_conv.", "quant_conv.")
    if _setting(config, "use_post_quant_conv"):
        out.params("post_quant_conv.", "post_quant_conv.")
    return out.links


def _modern_attention_name(key: str) -> str:
    for side in ("encoder", "decoder"):
        stem = f"{side}.mid_block.attentions.0."
        if key.startswith(stem):
            name, _, param = key[len(stem):].rpartition(".")
            return f"{stem}{_LEGACY_ATTENTION.get(name, name)}.{param}"
    return key


def vae_plan(config: Mapping[str, Any], direction: str) -> KeyPlan:
    """The plan for every tensor of the VAE described by `config` (a diffusers config)."""
    return plan_from_links(vae_links(config), direction)


def vae_plan_for_keys(config: Mapping[str, Any], keys: Iterable[str], direction: str) -> KeyPlan:
    if direction == "diffusers_to_ldm":
        rules = KeyRules("vae", canonical=_modern_attention_name)
    else:
        rules = KeyRules("vae", droppable=lambda key: key.startswith(_TRAINING_LEFTOVERS))
    return plan_from_keys(vae_links(config), direction, keys, rules)
