"""Models that sit beside a diffusion model: CLIP vision encoders and ESRGAN upscalers.

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
"""

from __future__ import annotations

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
    found = _esrgan_old(model) or _esrgan_new(model) or _compact(model)
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
