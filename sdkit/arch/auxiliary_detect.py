"""Models that sit beside a diffusion model: CLIP vision encoders and upscalers.

- Image encoders (ComfyUI `models/clip_vision`): HF `CLIPVisionModel(WithProjection)` keys,
  `vision_model.embeddings.patch_embedding.weight` [width, 3, patch, patch] and
  `vision_model.encoder.layers.N.*`; named by width and depth as the released ViTs
  (open_clip / HF configs: ViT-L/14 1024 x 24, ViT-H/14 1280 x 32, ViT-bigG/14 1664 x 48,
  SigLIP so400m/14 1152 x 27 with its `vision_model.head`); Wan 2.1 I2V runs with the
  ViT-H/14 one, ComfyUI's `clip_vision_h.safetensors`.
- Upscalers (ComfyUI `models/upscale_models`, A1111 `models/ESRGAN`): ESRGAN's RRDB network in
  the old layout (`model.0.weight`, `model.1.sub.N.RDB1.conv1.0.weight`) and the new one
  (`conv_first.weight`, `body.N.rdb1.conv1.weight` or `RRDB_trunk.N.*`), and Real-ESRGAN's
  compact SRVGGNet (`body.N.weight`, a single trunk of convs); the scale is counted from the
  upsampling convs (old layout: the convs between trunk and output) or, for the compact
  net, from the last conv's output channels (3 x scale^2), as spandrel's detection does.
- The transformer and lightweight upscalers people add beside them, by the keys spandrel
  (the detector ComfyUI's upscale loader runs) requires of each (spandrel 0.4
  `architectures/*/__init__.py`): SwinIR (`layers.N.residual_group.blocks.N.attn.
  relative_position_index`), HAT (its `overlap_attn` and `relative_position_index_SA`),
  DAT (`before_RG`, `layers.N.blocks.N.attn.attns.N.rpe_biases`), SPAN (`block_1.c1_r`,
  `upsampler.0`) and OmniSR (`residual_layer`, `input`, `up.0`). Their scale comes from the
  pixel-shuffle convs (`upsample.0`, `upsample.2`, …: each multiplies the size by the square
  root of its output over input channels), a direct pixel shuffle (output = channels x
  scale^2) or nearest-neighbour convs (`conv_up1`, `conv_up2`: 2x each), as spandrel reads it.
"""

from __future__ import annotations

import math
import re

from sdkit.arch.families import FAMILIES
from sdkit.arch.identity import Identity
from sdkit.io.model_file import ModelFile

_PATCH = "vision_model.embeddings.patch_embedding.weight"
_VISION_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")
# (width, layers) -> the released vision tower people name
_VISION_TOWERS = {(1024, 24): "CLIP-L vision", (1280, 32): "CLIP-H vision", (1664, 48): "CLIP-G vision",
                  (1152, 27): "SigLIP so400m vision"}


def identify_auxiliary(model: ModelFile) -> Identity | None:
    """An image encoder or an upscaler, else None."""
    return _image_encoder(model) or _upscaler(model)


def _image_encoder(model: ModelFile) -> Identity | None:
    shape = model.shape(_PATCH)
    if shape is None or len(shape) != 4:
        return None
    width = shape[0]
    layers = len({int(m.group(1)) for name in model.infos if (m := _VISION_LAYER.match(name))})
    tower = _VISION_TOWERS.get((width, layers))
    users = [f.name for f in FAMILIES.values() if any(r.image_encoder == tower for r in f.releases)] if tower else []
    identity = Identity(kind="image-encoder", family=users[0] if len(users) == 1 else "unknown",
                        key_convention="diffusers", components=["image_encoder"])
    identity.part = tower or f"vision encoder (width {width}, {layers} layers, patch {shape[2]})"
    identity.facts["image_encoder"] = {"width": width, "layers": layers, "patch": shape[2],
                                       "projection": "visual_projection.weight" in model.infos}
    return identity


def _upscaler(model: ModelFile) -> Identity | None:
    found = (_esrgan_old(model) or _esrgan_new(model) or _compact(model) or _hat(model) or _swinir(model)
             or _dat(model) or _span(model) or _omnisr(model))
    if found is None:
        return None
    design, scale = found
    identity = Identity(kind="upscaler", family="unknown", key_convention="unknown", components=["upscaler"])
    identity.part = f"{design} {scale}x upscaler" if scale else f"{design} upscaler"
    identity.facts["upscaler"] = {"design": design, "scale": scale}
    return identity


def _esrgan_old(model: ModelFile) -> tuple[str, int | None] | None:
    if "model.0.weight" not in model.infos or not any(".RDB1." in name for name in model.infos):
        return None
    convs = sorted({int(m.group(1)) for name in model.infos if (m := re.match(r"^model\.(\d+)\.weight$", name))})
    # model.0 (first conv), model.1 (trunk), then one conv per 2x upsampling, then two output convs
    upsamplers = max(len([i for i in convs if i > 1]) - 2, 0)
    return "ESRGAN", 2 ** upsamplers if upsamplers else 1


def _esrgan_new(model: ModelFile) -> tuple[str, int | None] | None:
    if "conv_first.weight" not in model.infos or not any(
            name.startswith(("body.", "RRDB_trunk.")) and ".rdb1." in name.lower() for name in model.infos):
        return None
    upsamplers = sum(1 for name in ("conv_up1.weight", "conv_up2.weight", "conv_up3.weight") if name in model.infos)
    return "ESRGAN", 2 ** upsamplers


def _compact(model: ModelFile) -> tuple[str, int | None] | None:
    convs = sorted({int(m.group(1)) for name in model.infos if (m := re.match(r"^body\.(\d+)\.weight$", name))})
    if not convs or len(model.infos) > 4 * len(convs) + 4 or model.shape(f"body.{convs[0]}.weight") is None:
        return None
    first, last = model.shape(f"body.{convs[0]}.weight"), model.shape(f"body.{convs[-1]}.weight")
    if len(first) != 4 or first[1] != 3 or len(last) != 4:
        return None
    scale = int(round((last[0] / 3) ** 0.5))
    return "Real-ESRGAN compact", scale if scale * scale * 3 == last[0] else None


def _has_all(model: ModelFile, *names: str) -> bool:
    return all(name in model.infos for name in names)


def _pixel_shuffle_scale(model: ModelFile, root: str) -> int:
    """The scale of a chain of pixel-shuffle convs `root.0`, `root.2`, …"""
    scale = 1
    for index in range(0, 10, 2):
        shape = model.shape(f"{root}.{index}.weight")
        if shape is None or len(shape) < 2 or not shape[1]:
            break
        scale *= math.isqrt(shape[0] // shape[1])
    return scale


def _direct_scale(rows: int, channels: int) -> int | None:
    """The scale of a direct pixel shuffle with `rows` outputs: channels x scale^2, the
    channels most likely the input's (else 3, 4 or 1)."""
    for count in (channels, 3, 4, 1):
        if count and rows % count == 0 and math.isqrt(rows // count) ** 2 == rows // count:
            return math.isqrt(rows // count)
    return None


def _swinir(model: ModelFile) -> tuple[str, int | None] | None:
    block = "layers.0.residual_group.blocks.0."
    if not _has_all(model, block + "norm1.weight", block + "mlp.fc1.bias", block + "attn.relative_position_index") \
            or not ("conv_first.weight" in model.infos or "conv_first.1.weight" in model.infos):
        return None
    if "conv_before_upsample.0.weight" in model.infos:
        if "conv_up1.weight" in model.infos:  # nearest-neighbour upsampling, 2x per conv
            return "SwinIR", 2 ** sum(1 for name in model.infos if "conv_up" in name and name.endswith(".weight"))
        return "SwinIR", _pixel_shuffle_scale(model, "upsample")
    if "upsample.0.weight" in model.infos:
        first = model.shape("conv_first.weight") or model.shape("conv_first.1.weight")
        out = (model.shape("conv_last.weight") or first)[0 if "conv_last.weight" in model.infos else 1]
        rows = (model.shape("upsample.0.bias") or (0,))[0]
        return "SwinIR", math.isqrt(rows // out) if out else None
    return "SwinIR", 1


def _hat(model: ModelFile) -> tuple[str, int | None] | None:
    group = "layers.0.residual_group."
    if not _has_all(model, "relative_position_index_SA", "conv_first.weight", "conv_last.weight",
                    group + "blocks.0.conv_block.cab.0.weight", group + "overlap_attn.qkv.weight"):
        return None
    return "HAT", _pixel_shuffle_scale(model, "upsample")


def _dat(model: ModelFile) -> tuple[str, int | None] | None:
    if not _has_all(model, "conv_first.weight", "before_RG.1.weight", "layers.0.blocks.0.attn.attns.0.rpe_biases",
                    "layers.0.blocks.0.ffn.sg.conv.weight"):
        return None
    if "conv_last.weight" in model.infos:
        return "DAT", _pixel_shuffle_scale(model, "upsample")
    shape = model.shape("upsample.0.weight")
    channels = (model.shape("conv_first.weight") or (0, 0))[1]
    return "DAT", math.isqrt(shape[0] // channels) if shape and channels else None


def _span(model: ModelFile) -> tuple[str, int | None] | None:
    if not _has_all(model, "conv_1.sk.weight", "block_1.c1_r.sk.weight", "conv_cat.weight", "upsampler.0.weight"):
        return None
    return "SPAN", _direct_scale(model.shape("upsampler.0.weight")[0], model.shape("conv_1.sk.weight")[1])


def _omnisr(model: ModelFile) -> tuple[str, int | None] | None:
    if not _has_all(model, "residual_layer.0.residual_layer.0.layer.0.fn.0.weight", "input.weight", "up.0.weight"):
        return None
    return "OmniSR", _direct_scale(model.shape("up.0.weight")[0], model.shape("input.weight")[1])
