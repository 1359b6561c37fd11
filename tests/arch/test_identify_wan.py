"""identify() on Wan 2.1 / 2.2 files beyond the shared release matrix: fp8 precisions,
look-alike releases, the Wan VAEs and UMT5-XXL alone, and layouts no other family claims.

Listings come from fixtures/families/released.py (checked against diffusers' converters in
tests/fixtures/test_family_headers.py); every file is header-only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))

from released import (RELEASES, UMT5_XXL, WAN21_VAE, WAN22_VAE, diffusers_shapes,  # noqa: E402
                      diffusers_wan_vae_shapes, ldm_vae_shapes, single_file_shapes, typed, umt5_shapes,
                      wan_vae_shapes, write_header_only)

from sdkit.arch import identify  # noqa: E402
from sdkit.io import open_model  # noqa: E402

WAN_RELEASES = [name for name, model in RELEASES.items() if model.family == "wan"]
UNET = "model.diffusion_model."


def identify_file(path: Path):
    with open_model(path) as model:
        return identify(model)


def scaled_fp8(shapes: dict) -> dict:
    """ComfyUI's scaled fp8 layout (as its `*_fp8_e4m3fn_scaled` Wan files)."""
    tensors = {}
    for name, shape in shapes.items():
        quantized = name.endswith(".weight") and len(shape) == 2
        tensors[UNET + name] = ("F8_E4M3" if quantized else "BF16", shape)
        if quantized:
            tensors[UNET + name[: -len("weight")] + "scale_weight"] = ("F32", ())
    tensors[UNET + "scaled_fp8"] = ("F8_E4M3", (0,))
    return tensors


@pytest.mark.parametrize("release", WAN_RELEASES)
@pytest.mark.parametrize("convention", ["ldm", "diffusers"])
def test_fp8_e4m3fn_wan_files_are_named(release, convention, tmp_path):
    model = RELEASES[release]
    shapes = single_file_shapes(model) if convention == "ldm" else diffusers_shapes(model)
    identity = identify_file(write_header_only(tmp_path / "wan.safetensors", typed(shapes, "F8_E4M3"),
                                               model.metadata))
    assert (identity.family, identity.facts["release"]) == ("wan", release)
    assert identity.precision.label == "fp8 e4m3fn"
    assert identity.summary.startswith(f"{release} diffusion model, fp8 e4m3fn; needs: UMT5-XXL")


@pytest.mark.parametrize("release", WAN_RELEASES)
def test_comfyui_scaled_fp8_wan_files_are_named(release, tmp_path):
    model = RELEASES[release]
    path = write_header_only(tmp_path / "wan.safetensors", scaled_fp8(single_file_shapes(model)), model.metadata)
    identity = identify_file(path)
    assert identity.facts["release"] == release
    assert identity.part == f"{release} diffusion model"
    assert identity.precision.label == "fp8 e4m3fn scaled"


@pytest.mark.parametrize("release, look_alikes", [
    ("Wan2.1-T2V-14B", ["Wan2.2-T2V-A14B"]),
    ("Wan2.1-I2V-14B-480P", ["Wan2.1-I2V-14B-720P"]),
])
def test_look_alike_wan_releases_are_left_to_metadata(release, look_alikes, tmp_path):
    path = write_header_only(tmp_path / "wan.safetensors", typed(single_file_shapes(RELEASES[release]), "BF16"))
    identity = identify_file(path)
    assert identity.facts["release"] == release
    assert identity.facts["release_look_alikes"] == look_alikes


def test_a_wan_relative_is_wan_but_no_release(tmp_path):
    shapes = dict(single_file_shapes(RELEASES["Wan2.1-T2V-1.3B"]))
    shapes["vace_blocks.0.before_proj.weight"] = (1536, 1536)
    identity = identify_file(write_header_only(tmp_path / "vace.safetensors", typed(shapes, "BF16")))
    assert identity.family == "wan" and "release" not in identity.facts
    assert identity.nonstandard


# that no other family claims a Wan file, and Wan no other family's, is
# test_identify_families.py::test_no_family_claims_another_familys_release


# Qwen-Image's VAE is the Wan 2.1 design with the same latent statistics (ComfyUI gives both
# the Wan21 latent format; Anima runs with the Qwen-Image VAE): the weights name the design,
# never one of the families
@pytest.mark.parametrize("config, family, part, compatible, channels", [
    (WAN21_VAE, "unknown", "16-channel video VAE (Qwen-Image VAE / Wan 2.1 VAE design: the weights alone do not tell which)",
     ["qwen-image", "wan", "anima"], 16),
    (WAN22_VAE, "wan", "Wan 2.2 VAE", ["wan"], 48),
])
@pytest.mark.parametrize("convention", ["ldm", "diffusers"])
def test_wan_vaes_alone_are_3d_video_vaes(config, family, part, compatible, channels, convention, tmp_path):
    shapes = wan_vae_shapes(config) if convention == "ldm" else diffusers_wan_vae_shapes(config)
    identity = identify_file(write_header_only(tmp_path / "vae.safetensors", typed(shapes, "BF16")))
    assert (identity.kind, identity.family, identity.part) == ("vae", family, part)
    assert identity.key_convention == convention and not identity.nonstandard
    assert identity.facts["latent_channels"] == channels and identity.facts["vae"]["video"]
    assert identity.facts["compatible_families"] == compatible


def test_image_vaes_are_never_wan(tmp_path):
    identity = identify_file(write_header_only(tmp_path / "ae.safetensors",
                                               typed(ldm_vae_shapes(16, quant_convs=False), "BF16")))
    assert "wan" not in identity.facts["compatible_families"]
    assert "Wan" not in identity.part


def test_umt5_xxl_alone_is_wans_text_encoder(tmp_path):
    tensors = typed(umt5_shapes(UMT5_XXL), "BF16")
    identity = identify_file(write_header_only(tmp_path / "umt5_xxl.safetensors", tensors))
    assert (identity.kind, identity.family, identity.part) == ("text-encoder", "wan", "UMT5-XXL encoder")
    assert identity.facts["text_encoders"][0]["architecture"] == "umt5"
