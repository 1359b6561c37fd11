"""Diffusers configs read off LDM key shapes, so a single file converts without a config.

Weights fix most fields (levels, channels, layers, attention placement, transformer depth,
linear or conv projections, context width, embeddings). What they cannot tell comes from
the SD family conventions, documented where used:
- attention heads: SD1's yaml has 8 heads everywhere (conv `proj_in`); SD2 and SDXL yamls
  have 64-channel heads (linear `proj_in`). Widths that are not multiples of 64 (toy
  models) get 8 heads, or fewer when 8 does not divide the width;
- text encoder heads: 64-channel heads (CLIP-L, OpenCLIP-H and bigG all use them);
  activation: `quick_gelu` for the HF-layout CLIP (OpenAI CLIP-L), `gelu` for OpenCLIP;
- `addition_time_embed_dim` (SDXL): 256 unless the caller knows better;
- sample sizes, norm groups (32), scaling factors, attention upcasting and token ids are
  not in the weights: family defaults or the caller's values.
Configs written for clients take these from the released model only where the sizes are
its sizes (`stock.py`); the derived guesses serve key maps and in-process models.
Every function takes the shapes of one component; `prefix` is cut from the keys first.
"""

from __future__ import annotations

import re
from math import gcd
from typing import Any, Mapping, Sequence

from sdkit.errors import SdkitError

Shapes = Mapping[str, Sequence[int]]


def _component(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    cut = len(prefix)
    return {key[cut:]: tuple(shape) for key, shape in shapes.items() if key.startswith(prefix)}


def _require(shapes: dict[str, tuple[int, ...]], key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise SdkitError(f"{what}: {key} is missing, cannot tell the model's shape")
    return shapes[key]


def _count(shapes: dict[str, tuple[int, ...]], pattern: str) -> int:
    """How many consecutive indices from 0 the pattern's `{}` takes among the keys."""
    head, _, tail = pattern.partition("{}")
    regex = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
    found = {int(m.group(1)) for key in shapes if (m := regex.fullmatch(key))}
    count = 0
    while count in found:
        count += 1
    return count


def attention_heads(width: int, per_64_channels: bool) -> int:
    """Heads for an attention of this width under the family conventions above."""
    if per_64_channels and width % 64 == 0:
        return width // 64
    return gcd(width, 8)


# ---- UNet ------------------------------------------------------------------------------

def _transformer_depth(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    return _count(shapes, prefix + "transformer_blocks.{}.norm1.weight")


def _down_levels(shapes: dict[str, tuple[int, ...]]) -> list[list[tuple[int, int]]]:
    """Per level, (output channels, transformer depth) of each input block's resnet."""
    levels: list[list[tuple[int, int]]] = [[]]
    block = 1
    while True:
        if f"input_blocks.{block}.0.op.weight" in shapes:
            levels.append([])
        elif f"input_blocks.{block}.0.in_layers.0.weight" in shapes:
            width = shapes[f"input_blocks.{block}.0.out_layers.3.weight"][0]
            levels[-1].append((width, _transformer_depth(shapes, f"input_blocks.{block}.1.")))
        else:
            break
        block += 1
    if not levels[-1]:
        raise SdkitError("unet: no resnet found after the last downsampler")
    return levels


def _up_depths(shapes: dict[str, tuple[int, ...]], layers: list[int]) -> list[list[int]]:
    depths, block = [], 0
    for count in layers[::-1]:
        level = [_transformer_depth(shapes, f"output_blocks.{block + n}.1.") for n in range(count + 1)]
        depths.append(level)
        block += count + 1
    if f"output_blocks.{block - 1}.0.in_layers.0.weight" not in shapes or \
            f"output_blocks.{block}.0.in_layers.0.weight" in shapes:
        raise SdkitError("unet: the output blocks do not match the input blocks")
    return depths


def _depth_entry(depths: list[int]) -> int | list[int]:
    return depths[0] if len(set(depths)) == 1 else depths


def _transformer_layers(down: list[list[int]], up: list[list[int]], mid: int) -> dict[str, Any]:
    """transformer_layers_per_block (and its reverse when the up path needs its own)."""
    if any(any(depths) and not all(depths) for depths in down + up):
        raise SdkitError("unet: a level has attention on some of its layers only, which diffusers cannot build")
    entries: list[Any] = [_depth_entry(d) if any(d) else None for d in down]
    if entries[-1] is None:
        entries[-1] = mid  # diffusers builds the mid block from the last level's entry
    if (entries[-1] if isinstance(entries[-1], int) else entries[-1][0]) != mid:  # mid reads entry [0]
        raise SdkitError("unet: the middle block's transformer depth differs from the deepest level's")
    needs_reverse = any(isinstance(e, list) for e in entries)
    for level, depths in enumerate(up):
        if not any(depths):
            continue
        counterpart = len(up) - 1 - level
        wanted = _depth_entry(depths)
        if entries[counterpart] is None and isinstance(wanted, int):
            entries[counterpart] = wanted
        elif entries[counterpart] != wanted:
            needs_reverse = True
    known = {str(e) for e in entries if e is not None}
    # levels without attention take any depth; the shared one keeps the config a single number
    filler = entries[-1] if len(known) == 1 and isinstance(entries[-1], int) else 1
    entries = [filler if e is None else e for e in entries]
    uniform = all(isinstance(e, int) for e in entries) and len(set(entries)) == 1
    settings: dict[str, Any] = {"transformer_layers_per_block": entries[0] if uniform else entries}
    if needs_reverse:
        settings["reverse_transformer_layers_per_block"] = [[d or 1 for d in depths] for depths in up]
    return settings


def _attention_settings(shapes: dict[str, tuple[int, ...]], channels: list[int]) -> dict[str, Any]:
    # the middle block always has a transformer (checked before)
    linear = len(_require(shapes, "middle_block.1.proj_in.weight", "unet")) == 2
    to_k = "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    per_64 = linear and all(c % 64 == 0 for c in channels)
    heads = [attention_heads(c, per_64_channels=per_64) for c in channels]
    return {
        "cross_attention_dim": _require(shapes, to_k, "unet")[1],
        "use_linear_projection": linear,
        "attention_head_dim": heads[0] if len(set(heads)) == 1 and not linear else heads,
    }


def _embedding_settings(shapes: dict[str, tuple[int, ...]], addition_time_embed_dim: int) -> dict[str, Any]:
    if "label_emb.0.0.weight" in shapes:  # SDXL: text embeds + size/crop conditioning
        return {"addition_embed_type": "text_time", "addition_time_embed_dim": addition_time_embed_dim,
                "projection_class_embeddings_input_dim": shapes["label_emb.0.0.weight"][1]}
    if "label_emb.weight" in shapes:  # a class-label table (x4 upscaler)
        return {"num_class_embeds": shapes["label_emb.weight"][0]}
    return {}


def infer_unet_config_from_ldm(shapes: Shapes, prefix: str = "", addition_time_embed_dim: int = 256) -> dict:
    """A `UNet2DConditionModel` config that holds exactly the LDM UNet's tensors."""
    s = _component(shapes, prefix)
    conv_in = _require(s, "input_blocks.0.0.weight", "unet")
    down = _down_levels(s)
    layers = [len(level) for level in down]
    channels = [level[0][0] for level in down]
    down_depths = [[depth for _, depth in level] for level in down]
    up_depths = _up_depths(s, layers)
    mid_depth = _transformer_depth(s, "middle_block.1.")
    if not mid_depth:
        raise SdkitError("unet: the middle block has no transformer, which diffusers' UNet needs")
    time_width = _require(s, "time_embed.0.weight", "unet")[0]
    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": conv_in[1],
        "out_channels": _require(s, "out.2.weight", "unet")[0],
        "block_out_channels": channels,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": ["CrossAttnDownBlock2D" if any(d) else "DownBlock2D" for d in down_depths],
        "up_block_types": ["CrossAttnUpBlock2D" if any(d) else "UpBlock2D" for d in up_depths],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
    }
    config.update(_transformer_layers(down_depths, up_depths, mid_depth))
    config.update(_attention_settings(s, channels))
    config.update(_embedding_settings(s, addition_time_embed_dim))
    if time_width != 4 * channels[0]:
        config["time_embedding_dim"] = time_width
    for name, key in (("conv_in_kernel", "input_blocks.0.0.weight"), ("conv_out_kernel", "out.2.weight")):
        kernel = s[key][2:]
        if kernel and kernel[0] != 3:  # diffusers' default
            config[name] = kernel[0]
    # sample size is a family default, not a weight: SDXL 128, SD2-768 96, SD1 64 latents
    linear_1024 = config.get("use_linear_projection") and config.get("cross_attention_dim") == 1024
    config["sample_size"] = 128 if "addition_embed_type" in config else 96 if linear_1024 else 64
    return config


# ---- VAE -------------------------------------------------------------------------------

def infer_vae_config_from_ldm(shapes: Shapes, prefix: str = "", scaling_factor: float = 0.18215,
                              sample_size: int = 512) -> dict:
    """An `AutoencoderKL` config that holds exactly the LDM VAE's tensors.

    `scaling_factor` and `sample_size` (the image size diffusers tiles at) are family
    conventions: SD1/SD2 0.18215 and 512, SDXL 0.13025 and 1024.
    """
    s = _component(shapes, prefix)
    conv_in = _require(s, "encoder.conv_in.weight", "vae")
    levels = _count(s, "encoder.down.{}.block.0.conv1.weight")
    layers = _count(s, "encoder.down.0.block.{}.conv1.weight")
    if not levels or not layers:
        raise SdkitError("vae: no encoder.down.*.block.* resnets found")
    channels = [_require(s, f"encoder.down.{i}.block.{layers - 1}.conv2.weight", "vae")[0] for i in range(levels)]
    latent = _require(s, "decoder.conv_in.weight", "vae")[1]
    if _require(s, "encoder.conv_out.weight", "vae")[0] != 2 * latent:
        raise SdkitError("vae: the encoder does not output a mean and a variance per latent channel")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": conv_in[1],
        "out_channels": _require(s, "decoder.conv_out.weight", "vae")[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": latent,
        "use_quant_conv": "quant_conv.weight" in s,
        "use_post_quant_conv": "post_quant_conv.weight" in s,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in s,
        "scaling_factor": scaling_factor,
        "sample_size": sample_size,
    }


# ---- text encoders ---------------------------------------------------------------------

def _clip_style(s: dict[str, tuple[int, ...]]) -> str:
    if "token_embedding.weight" in s:
        return "openclip"
    if "text_model.embeddings.token_embedding.weight" in s or "embeddings.token_embedding.weight" in s:
        return "hf"
    raise SdkitError("text encoder: no token embedding table found")


def infer_clip_config_from_ldm(shapes: Shapes, prefix: str = "") -> dict:
    """A `CLIPTextConfig` dict for an LDM text encoder, every layer and the projection kept.

    `architectures` says `CLIPTextModelWithProjection` when the file has a projection.
    """
    s = _component(shapes, prefix)
    style = _clip_style(s)
    if style == "openclip":
        tokens, positions = s["token_embedding.weight"], _require(s, "positional_embedding", "text encoder")
        layers = _count(s, "transformer.resblocks.{}.ln_1.weight")
        intermediate = _require(s, "transformer.resblocks.0.mlp.c_fc.weight", "text encoder")[0]
        projection = s["text_projection"][1] if "text_projection" in s else None
    else:
        if "text_model.embeddings.token_embedding.weight" not in s:
            s = {f"text_model.{k}" if k != "text_projection.weight" else k: v for k, v in s.items()}
        tokens = s["text_model.embeddings.token_embedding.weight"]
        positions = _require(s, "text_model.embeddings.position_embedding.weight", "text encoder")
        layers = _count(s, "text_model.encoder.layers.{}.layer_norm1.weight")
        intermediate = _require(s, "text_model.encoder.layers.0.mlp.fc1.weight", "text encoder")[0]
        projection = s["text_projection.weight"][0] if "text_projection.weight" in s else None
    width = tokens[1]
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": tokens[0],
        "hidden_size": width,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": attention_heads(width, per_64_channels=True),
        "max_position_embeddings": positions[0],
        "projection_dim": projection or width,
        "hidden_act": "gelu" if style == "openclip" else "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
