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
