"""identify() on diffusers pipeline folders of the transformer families: full-size folders
with header-only weights and hand-written model_index.json and configs, and tiny folders
saved by the peers' own save_pretrained (fixtures/families/released.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "families"
sys.path.insert(0, str(FIXTURES))

from released import PIPELINES, RELEASES, TINY, write_header_only_pipeline, write_tiny_pipeline  # noqa: E402

from sdkit.arch import identify  # noqa: E402
from sdkit.io import open_model  # noqa: E402

RELEASED = {"flux": "FLUX.1-dev", "sd3": "Stable Diffusion 3.5 Large", "z-image": "Z-Image",
            "qwen-image": "Qwen-Image", "lumina2": "Lumina-Image-2.0", "hidream": "HiDream-I1",
            "wan": "Wan2.1-T2V-14B", "chroma": "Chroma1-HD"}
DESIGNS = {"flux": "FLUX.1-schnell", "sd3": "Stable Diffusion 3 Medium", "z-image": "Z-Image",
           "qwen-image": "Qwen-Image", "lumina2": "Lumina-Image-2.0", "hidream": "HiDream-I1",
           "wan": "Wan2.1-T2V-1.3B", "chroma": "Chroma1-HD"}
# the img2img / inpaint / image-to-video / edit pipelines of each family, in diffusers
VARIANT_PIPELINES = [("flux", "FluxImg2ImgPipeline"), ("flux", "FluxInpaintPipeline"),
                     ("sd3", "StableDiffusion3Img2ImgPipeline"), ("sd3", "StableDiffusion3InpaintPipeline"),
                     ("z-image", "ZImageImg2ImgPipeline"), ("qwen-image", "QwenImageEditPipeline"),
                     ("qwen-image", "QwenImageEditPlusPipeline"), ("qwen-image", "QwenImageInpaintPipeline"),
                     ("lumina2", "Lumina2Pipeline"), ("wan", "WanImageToVideoPipeline")]


def components_of(family: str) -> list[str]:
    return ["transformer", "vae", *PIPELINES[family][1]]


def identify_folder(folder: Path):
    with open_model(folder) as model:
        return identify(model)


@pytest.mark.parametrize("family", list(PIPELINES))
def test_full_size_pipeline_folder_is_a_checkpoint_of_its_release(family, tmp_path):
    release = RELEASED[family]
    identity = identify_folder(write_header_only_pipeline(tmp_path, release))
    assert (identity.kind, identity.family, identity.key_convention) == ("checkpoint", family, "diffusers")
    assert identity.facts["release"] == release and not identity.nonstandard
    assert identity.components == components_of(family)
    assert identity.part == f"{release} checkpoint" and identity.needs == []
    assert identity.facts["pipeline_class"] == PIPELINES[family][0]
    assert identity.summary == f"{release} checkpoint, {'fp16' if RELEASES[release].dtype == 'F16' else 'bf16'}"


@pytest.mark.parametrize("family", [family for family in TINY if family in PIPELINES])
def test_tiny_pipeline_folder_saved_by_the_peers_is_its_family(family, tmp_path):
    identity = identify_folder(write_tiny_pipeline(tmp_path, family))
    assert (identity.kind, identity.family, identity.key_convention) == ("checkpoint", family, "diffusers")
    assert "release" not in identity.facts and identity.facts["design"] == DESIGNS[family]
    assert identity.components == components_of(family)
    assert identity.needs == [] and identity.nonstandard


@pytest.mark.parametrize("family, pipeline_class", VARIANT_PIPELINES)
def test_variant_pipelines_of_a_family(family, pipeline_class, tmp_path):
    identity = identify_folder(write_tiny_pipeline(tmp_path, family, pipeline_class))
    assert (identity.kind, identity.family) == ("checkpoint", family)
    assert identity.facts["pipeline_class"] == pipeline_class
    assert not any("model_index.json" in note for note in identity.notes)


def test_a_pipeline_class_of_another_family_is_noted(tmp_path):
    identity = identify_folder(write_tiny_pipeline(tmp_path, "z-image", "Lumina2Pipeline"))
    assert identity.family == "z-image"
    assert "model_index.json names Lumina2Pipeline (Lumina-Image 2.0); the weights say z-image" in identity.notes


def test_a_folder_without_its_transformer_is_named_by_its_pipeline_class(tmp_path):
    write_header_only_pipeline(tmp_path, "Qwen-Image", "QwenImageEditPlusPipeline")
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["transformer"] = [None, None]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    identity = identify_folder(tmp_path)
    assert (identity.kind, identity.family) == ("checkpoint", "qwen-image")
    assert identity.components == ["vae", "text_encoder"]
    assert identity.needs == ["Qwen-Image diffusion model"]
    assert "family from model_index.json: QwenImageEditPlusPipeline" in identity.notes
