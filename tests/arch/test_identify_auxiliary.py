"""Image encoders (CLIP vision) and upscalers (ESRGAN) are named, not left unknown, and the
library files them where the WebUIs read them (full-size header-only files)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))

from released import typed, write_header_only  # noqa: E402

from sdkit.arch import identify  # noqa: E402
from sdkit.io import open_model  # noqa: E402

# openai/clip-vit-large-patch14 and laion CLIP-ViT-H-14 vision towers (HF configs)
VISION = {"CLIP-L vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, patch_size=14, image_size=224, projection_dim=768),
          "CLIP-H vision": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                num_attention_heads=16, patch_size=14, image_size=224, projection_dim=1024)}


def vision_shapes(config: dict) -> dict:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def esrgan_old_shapes(blocks: int = 23, width: int = 64, grow: int = 32) -> dict:
    """ESRGAN's original RRDB_ESRGAN_x4.pth layout: model.0 conv, model.1 trunk of RRDBs,
    model.3 / model.6 upsampling convs, model.8 / model.10 output convs."""
    shapes = {"model.0.weight": (width, 3, 3, 3), "model.0.bias": (width,)}
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for conv in range(1, 6):
                inputs, out = width + (conv - 1) * grow, grow if conv < 5 else width
                name = f"model.1.sub.{block}.RDB{rdb}.conv{conv}.0"
                shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inputs, 3, 3), (out,)
    shapes[f"model.1.sub.{blocks}.weight"], shapes[f"model.1.sub.{blocks}.bias"] = (width, width, 3, 3), (width,)
    for index in (3, 6, 8):
        shapes[f"model.{index}.weight"], shapes[f"model.{index}.bias"] = (width, width, 3, 3), (width,)
    shapes["model.10.weight"], shapes["model.10.bias"] = (3, width, 3, 3), (3,)
    return shapes


def compact_shapes(scale: int, convs: int = 16, width: int = 64) -> dict:
    """Real-ESRGAN's SRVGGNetCompact (realesr-general-x4v3): conv, PReLU pairs in `body`."""
    shapes, index = {"body.0.weight": (width, 3, 3, 3), "body.0.bias": (width,)}, 1
    for _ in range(convs):
        shapes[f"body.{index}.weight"] = (width,)  # PReLU
        shapes[f"body.{index + 1}.weight"], shapes[f"body.{index + 1}.bias"] = (width, width, 3, 3), (width,)
        index += 2
    shapes[f"body.{index}.weight"] = (width,)
    shapes[f"body.{index + 1}.weight"] = (3 * scale * scale, width, 3, 3)
    shapes[f"body.{index + 1}.bias"] = (3 * scale * scale,)
    return shapes


def _conv(shapes: dict, name: str, out: int, width: int, size: int = 3) -> None:
    shapes[f"{name}.weight"] = (out, width, size, size)
    shapes[f"{name}.bias"] = (out,)


def _pixel_shuffle(shapes: dict, root: str, width: int, scale: int) -> None:
    """Upsample convs as the SR transformers chain them: one 4 x width conv per 2x."""
    for step in range(scale.bit_length() - 1):
        _conv(shapes, f"{root}.{2 * step}", 4 * width, width)


def swinir_shapes(scale: int, upsampler: str) -> dict:
    """SwinIR (JingyunLiang/SwinIR `network_swinir.py`, the keys spandrel requires)."""
    shapes: dict = {}
    _conv(shapes, "conv_first", 180, 3)
    block = "layers.0.residual_group.blocks.0."
    shapes[block + "norm1.weight"] = (180,)
    shapes[block + "mlp.fc1.bias"] = (360,)
    shapes[block + "attn.relative_position_index"] = (64, 64)
    if upsampler == "pixelshuffle":
        _conv(shapes, "conv_before_upsample.0", 64, 180)
        _pixel_shuffle(shapes, "upsample", 64, scale)
        _conv(shapes, "conv_last", 3, 64)
    elif upsampler == "nearest+conv":
        _conv(shapes, "conv_before_upsample.0", 64, 180)
        for step in range(1, scale.bit_length()):
            _conv(shapes, f"conv_up{step}", 64, 64)
        _conv(shapes, "conv_last", 3, 64)
    else:  # pixelshuffledirect: one conv to 3 x scale^2 channels
        _conv(shapes, "upsample.0", 3 * scale * scale, 180)
    return shapes


def hat_shapes(scale: int) -> dict:
    """HAT (XPixelGroup/HAT `hat_arch.py`): SwinIR-like groups with channel-attention conv
    blocks and an overlapping cross-attention per group."""
    shapes = {"relative_position_index_SA": (256, 256), "layers.0.residual_group.blocks.0.norm1.weight": (180,)}
    _conv(shapes, "conv_first", 180, 3)
    _conv(shapes, "layers.0.residual_group.blocks.0.conv_block.cab.0", 60, 180)
    shapes["layers.0.residual_group.overlap_attn.qkv.weight"] = (540, 180)
    _conv(shapes, "conv_before_upsample.0", 64, 180)
    _pixel_shuffle(shapes, "upsample", 64, scale)
    _conv(shapes, "conv_last", 3, 64)
    return shapes


def dat_shapes(scale: int) -> dict:
    """DAT (zhengchen1999/DAT): `before_RG`, dual-aggregation blocks with position biases."""
    shapes = {"before_RG.1.weight": (180,), "layers.0.blocks.0.attn.attns.0.rpe_biases": (255, 2),
              "layers.0.blocks.0.ffn.sg.conv.weight": (360, 1, 3, 3)}
    _conv(shapes, "conv_first", 180, 3)
    _conv(shapes, "conv_before_upsample.0", 64, 180)
    _pixel_shuffle(shapes, "upsample", 64, scale)
    _conv(shapes, "conv_last", 3, 64)
    return shapes


def span_shapes(scale: int) -> dict:
    """SPAN (hongyuanyu/SPAN): re-parameterised convs (`sk`, `eval_conv`), a direct pixel shuffle."""
    shapes: dict = {}
    for name, out, width in (("conv_1.sk", 48, 3), ("block_1.c1_r.sk", 48, 48), ("conv_cat", 48, 192),
                             ("upsampler.0", 3 * scale * scale, 48)):
        _conv(shapes, name, out, width, 1 if name.endswith(".sk") else 3)
    return shapes


def omnisr_shapes(scale: int) -> dict:
    """OmniSR (Francis0625/Omni-SR): `input` conv, `residual_layer` groups, `up.0` pixel shuffle."""
    shapes: dict = {}
    _conv(shapes, "input", 64, 3)
    _conv(shapes, "residual_layer.0.residual_layer.0.layer.0.fn.0", 64, 64, 1)
    _conv(shapes, "up.0", 3 * scale * scale, 64)
    return shapes


def identify_file(path: Path):
    with open_model(path) as model:
        return identify(model)


@pytest.mark.parametrize("tower", list(VISION))
def test_clip_vision_towers_are_named(tower, tmp_path):
    path = write_header_only(tmp_path / "clip_vision.safetensors", typed(vision_shapes(VISION[tower]), "F16"))
    identity = identify_file(path)
    assert (identity.kind, identity.part) == ("image-encoder", tower)
    assert identity.family == ("wan" if tower == "CLIP-H vision" else "unknown")  # Wan 2.1 I2V's encoder


@pytest.mark.parametrize("shapes, part", [
    (esrgan_old_shapes(), "ESRGAN 4x upscaler"),
    (compact_shapes(4), "Real-ESRGAN compact 4x upscaler"),
    (compact_shapes(2), "Real-ESRGAN compact 2x upscaler"),
    (swinir_shapes(4, "pixelshuffle"), "SwinIR 4x upscaler"),
    (swinir_shapes(2, "nearest+conv"), "SwinIR 2x upscaler"),
    (swinir_shapes(4, "nearest+conv"), "SwinIR 4x upscaler"),
    (swinir_shapes(3, "pixelshuffledirect"), "SwinIR 3x upscaler"),
    (hat_shapes(4), "HAT 4x upscaler"),
    (dat_shapes(2), "DAT 2x upscaler"),
    (span_shapes(2), "SPAN 2x upscaler"),
    (span_shapes(4), "SPAN 4x upscaler"),
    (omnisr_shapes(4), "OmniSR 4x upscaler"),
])
def test_upscalers_are_named_with_their_scale(shapes, part, tmp_path):
    identity = identify_file(write_header_only(tmp_path / "up.safetensors", typed(shapes, "F32")))
    assert (identity.kind, identity.part) == ("upscaler", part)


def test_the_library_files_them_where_comfyui_reads_them(tmp_path):
    from sdkit.hub.library import Library

    vision = write_header_only(tmp_path / "clip_vision_h.safetensors",
                               typed(vision_shapes(VISION["CLIP-H vision"]), "F16"))
    upscaler = write_header_only(tmp_path / "4x-esrgan.safetensors", typed(esrgan_old_shapes(), "F32"))
    with Library.init(tmp_path / "ComfyUI", "comfyui") as library:
        placed = library.add([vision, upscaler])
    root = tmp_path / "ComfyUI"
    assert (root / "models/clip_vision/clip_vision_h.safetensors").is_file()
    assert (root / "models/upscale_models/4x-esrgan.safetensors").is_file()
    assert {placement.entry.kind for placement in placed} == {"image-encoder", "upscaler"}
    assert {placement.entry.part for placement in placed} == {"CLIP-H vision", "ESRGAN 4x upscaler"}
