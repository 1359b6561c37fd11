"""The family table and the metadata strings that name families."""

from __future__ import annotations

import inspect

import pytest

from sdkit.arch.families import (FAMILIES, default_resolution, family_from_kohya_version,
                                 family_from_modelspec, kohya_base_model_version,
                                 modelspec_architecture)
from sdkit.arch.metadata import metadata_hints


def test_sd_vae_scaling_matches_diffusers_default():
    from diffusers import AutoencoderKL

    default = inspect.signature(AutoencoderKL.__init__).parameters["scaling_factor"].default
    assert FAMILIES["sd1"].vae_scaling_factor == FAMILIES["sd2"].vae_scaling_factor == default


@pytest.mark.parametrize("version, family", [
    ("sd_v1", "sd1"), ("sd_v2_v", "sd2"), ("sd_1.5", "sd1"), ("sd_2.1", "sd2"),
    ("sdxl_base_v1-0", "sdxl-base"), ("sdxl_", "sdxl-base"), ("flux1", "flux"), ("FLUX.1-dev", "flux"),
    ("chroma", "chroma"), ("chroma_radiance", "chroma-radiance"), ("flux2", "flux2"), ("FLUX.2-dev", "flux2"),
    ("flux_2", "flux2"), ("not-a-model", None),
])
def test_kohya_versions_as_trainers_write_them(version, family):
    assert family_from_kohya_version(version) == family


@pytest.mark.parametrize("architecture, family", [
    ("stable-diffusion-v1-inpainting/lora", "sd1"), ("stable-diffusion-v2-768-v", "sd2"),
    ("stable-diffusion-xl-v1-refiner", "sdxl-refiner"), ("stable-diffusion-xl-turbo-v1", "sdxl-base"),
    ("stable-diffusion-v3-medium", "sd3"), ("stable-diffusion-3-large/lora", "sd3"),
    ("flux-1-schnell/lora", "flux"), ("lumina-2", "lumina2"), ("Z-Image/lora", "z-image"),
    ("Qwen-Image-Edit-Plus/lora", "qwen-image"), ("hunyuan-video", None), ("chroma/lora", "chroma"),
    ("chroma_radiance/lora", "chroma-radiance"), ("Flux.2-dev/lora", "flux2"), ("Flux.2-klein-4b", "flux2"),
])
def test_modelspec_architectures(architecture, family):
    assert family_from_modelspec(architecture) == family


def test_modelspec_and_kohya_strings_for_writers():
    assert modelspec_architecture("sd2", prediction="v") == "stable-diffusion-v2-768-v"
    assert modelspec_architecture("sd1", variant="inpaint", adapter="lora") == \
        "stable-diffusion-v1-inpainting/lora"
    assert modelspec_architecture("sdxl-base", adapter="textual-inversion") == \
        "stable-diffusion-xl-v1-base/textual-inversion"
    assert modelspec_architecture("kolors") is None
    assert kohya_base_model_version("sd2", prediction="v") == "sd_v2_v"
    assert kohya_base_model_version("sdxl-base") == "sdxl_base_v1-0"
    assert default_resolution("sd2", prediction="v") == 768 and default_resolution("sd1") == 512


@pytest.mark.parametrize("family", [name for name, ref in FAMILIES.items() if ref.modelspec_architecture])
def test_written_strings_read_back_as_the_same_family(family):
    assert family_from_modelspec(modelspec_architecture(family)) == family
    version = kohya_base_model_version(family)
    assert version is None or family_from_kohya_version(version) == family


@pytest.mark.parametrize("metadata, family, prediction", [
    ({"ss_v2": "True"}, "sd2", None),
    ({"ss_base_model_version": "sd_v2_v"}, "sd2", "v"),
    ({"ss_base_model_version": "sd_v1"}, "sd1", "epsilon"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2", "v"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.prediction_type": "v"},
     "sdxl-base", "v"),
    ({"ss_model_type": "chroma", "ss_base_model_version": "flux1"}, "chroma", None),
    ({"ss_model_type": "flux", "ss_base_model_version": "flux1"}, "flux", None),
    ({}, None, None),
])
def test_metadata_claims(metadata, family, prediction):
    hints = metadata_hints(metadata)
    assert (hints.family, hints.prediction) == (family, prediction)
