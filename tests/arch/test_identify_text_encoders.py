"""identify() on the decoder language models the 2026 families use as text encoders, at
full size from headers alone: alone in every key layout people keep (transformers 5,
the hub's transformers 4 files, ComfyUI's `models/text_encoders` files, the bare base
model), in scaled fp8, and inside ComfyUI all-in-one checkpoints.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "families"
sys.path.insert(0, str(FIXTURES))

from released import (LANGUAGE_MODELS, RELEASES, WAN21_VAE, base_model_layout, comfyui_layout,  # noqa: E402
                      language_model_shapes, ldm_vae_shapes, legacy_hub_layout, single_file_shapes, typed,
                      wan_vae_shapes, write_header_only)
from test_identify_families import scaled_fp8  # noqa: E402

from sdkit.arch import identify  # noqa: E402
from sdkit.io import open_model  # noqa: E402

# part -> (family, families in the fact, other models in the fact, component, layouts with a vision tower)
EXPECTED = {
    "Qwen3-0.6B": ("anima", None, None, "text_encoder", ()),
    "Qwen3-4B": ("unknown", ["flux2", "z-image"], [], "text_encoder", ()),
    "Qwen3-8B": ("flux2", None, None, "text_encoder", ()),
    "Qwen2.5-VL-7B": ("unknown", ["qwen-image"], ["HunyuanImage-2.1"], "text_encoder",
                      ("transformers", "hub", "comfyui")),
    "Gemma-2-2B": ("lumina2", None, None, "text_encoder", ()),
    "Llama-3.1-8B": ("hidream", None, None, "text_encoder_4", ()),
    "Mistral-Small-3.1-24B": ("flux2", None, None, "text_encoder", ("transformers", "hub")),
}
# part -> (design, hidden width, layers, vocabulary)
SIZES = {"Qwen3-0.6B": ("qwen3", 1024, 28, 151936), "Qwen3-4B": ("qwen3", 2560, 36, 151936), "Qwen3-8B": ("qwen3", 4096, 36, 151936),
         "Qwen2.5-VL-7B": ("qwen2.5-vl", 3584, 28, 152064), "Gemma-2-2B": ("gemma2", 2304, 26, 256000),
         "Llama-3.1-8B": ("llama", 4096, 32, 128256), "Mistral-Small-3.1-24B": ("llama", 5120, 40, 131072)}
LAYOUTS = ("transformers", "hub", "comfyui", "base")


@pytest.fixture(scope="module")
def shapes_of():
    cache: dict[str, dict] = {}

    def get(part: str, layout: str = "transformers") -> dict:
        if part not in cache:
            cache[part] = language_model_shapes(LANGUAGE_MODELS[part])
        shapes = cache[part]
        if layout == "hub":
            return legacy_hub_layout(LANGUAGE_MODELS[part], shapes)
        if layout == "comfyui":
            return comfyui_layout(shapes)
        return base_model_layout(shapes) if layout == "base" else shapes
    return get


def identify_tensors(tmp_path: Path, tensors: dict):
    with open_model(write_header_only(tmp_path / "model.safetensors", tensors)) as model:
        return identify(model)


@pytest.mark.parametrize("part", list(LANGUAGE_MODELS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_language_model_alone_in_each_layout(part, layout, shapes_of, tmp_path):
    identity = identify_tensors(tmp_path, typed(shapes_of(part, layout), "BF16"))
    family, families, others, component, with_vision = EXPECTED[part]
    assert (identity.kind, identity.family, identity.part) == ("text-encoder", family, f"{part} text encoder")
    assert identity.summary == f"{part} text encoder, bf16" and not identity.nonstandard
    assert identity.components == [component]
    (encoder,) = identity.facts["text_encoders"]
    assert (encoder["architecture"], encoder["width"], encoder["layers"], encoder["vocab"]) == SIZES[part]
    assert encoder["vision"] == (layout in with_vision)
    assert identity.facts.get("encoder_families") == families
    assert identity.facts.get("encoder_other_models") == (others or None)
    assert "unknown_transformer" not in identity.facts


def test_a_shared_encoder_names_its_users_in_a_note(shapes_of, tmp_path):
    identity = identify_tensors(tmp_path, typed(shapes_of("Qwen3-4B", "comfyui"), "BF16"))
    assert identity.notes == ["Qwen3-4B: used by FLUX.2, Z-Image; the weights alone do not tell which"]


@pytest.mark.parametrize("part", list(LANGUAGE_MODELS))
def test_scaled_fp8_language_models(part, shapes_of, tmp_path):
    identity = identify_tensors(tmp_path, scaled_fp8(shapes_of(part, "comfyui"), prefix=""))
    assert (identity.kind, identity.part) == ("text-encoder", f"{part} text encoder")
    assert identity.summary == f"{part} text encoder, fp8 e4m3fn scaled"


@pytest.mark.parametrize("part, changed, value", [
    ("Llama-3.1-8B", "model.embed_tokens.weight", (128320, 4096)),  # HunyuanVideo's llava-llama-3-8b
    ("Mistral-Small-3.1-24B", "model.layers.39.", None),  # pruned: one layer short
    ("Qwen3-4B", "model.embed_tokens.weight", (217204, 2560)),  # ACE-Step's Qwen3-4B language model
])
def test_a_relative_of_another_size_is_not_named_as_the_released_one(part, changed, value, shapes_of, tmp_path):
    shapes = dict(shapes_of(part, "comfyui"))
    if value is None:
        shapes = {name: shape for name, shape in shapes.items() if not name.startswith(changed)}
    else:
        shapes[changed] = value
    identity = identify_tensors(tmp_path, typed(shapes, "BF16"))
    design, width = SIZES[part][:2]
    assert (identity.kind, identity.family) == ("text-encoder", "unknown")
    assert identity.part == f"{design} (width {width}) text encoder"


def test_the_decoder_designs_are_told_apart_at_one_width(shapes_of, tmp_path):
    """Llama-3.1-8B and Qwen3-8B are both 4096 wide: Qwen3's per-head norms tell them apart."""
    parts = {identify_tensors(tmp_path, typed(shapes_of(part, "comfyui"), "BF16")).part
             for part in ("Llama-3.1-8B", "Qwen3-8B")}
    assert parts == {"Llama-3.1-8B text encoder", "Qwen3-8B text encoder"}


UNET = "model.diffusion_model."


@pytest.mark.parametrize("release, part", [
    ("Z-Image", "Qwen3-4B"), ("Qwen-Image", "Qwen2.5-VL-7B"), ("Lumina-Image-2.0", "Gemma-2-2B"),
    ("Anima-2B", "Qwen3-0.6B"),
])
def test_comfyui_all_in_one_checkpoints(release, part, shapes_of, tmp_path):
    model = RELEASES[release]
    tensors = typed(single_file_shapes(model), "BF16", UNET)
    slot = LANGUAGE_MODELS[part].comfy_slot
    tensors.update(typed(shapes_of(part, "comfyui"), "BF16", f"text_encoders.{slot}.transformer."))
    qwen_image_vae = model.family in ("qwen-image", "anima")
    vae = wan_vae_shapes(WAN21_VAE) if qwen_image_vae else ldm_vae_shapes(16, quant_convs=False)
    tensors.update(typed(vae, "BF16", "vae."))
    identity = identify_tensors(tmp_path, tensors)
    assert (identity.kind, identity.family, identity.facts["release"]) == ("checkpoint", model.family, release)
    assert identity.components == ["transformer", "vae", "text_encoder"]
    assert identity.needs == [] and identity.part == f"{release} checkpoint" and not identity.nonstandard
    (encoder,) = identity.facts["text_encoders"]
    assert encoder["prefix"] == f"text_encoders.{slot}.transformer."


def test_comfyui_hidream_checkpoint_with_its_llama(shapes_of, tmp_path):
    tensors = typed(single_file_shapes(RELEASES["HiDream-I1"]), "BF16", UNET)
    tensors.update(typed(shapes_of("Llama-3.1-8B", "comfyui"), "F8_E4M3", "text_encoders.llama.transformer."))
    identity = identify_tensors(tmp_path, tensors)
    assert (identity.kind, identity.family) == ("checkpoint", "hidream")
    assert identity.components == ["transformer", "text_encoder_4"] and not identity.nonstandard
    assert identity.needs == ["CLIP-L", "CLIP-G", "T5-XXL", "FLUX VAE"]
