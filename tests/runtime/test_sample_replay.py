"""`sdkit sample --from-png`: A1111 `parameters` texts and ComfyUI API graphs read into
sample options, and sdkit's own PNGs drawn again pixel for pixel."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from runtime_models import SIZE

from sdkit.errors import SdkitError
from sdkit.runtime.sample.replay import read_replay, replay_a1111, replay_comfy

# written as A1111's create_infotext lays a hires-fixed txt2img out (modules/processing.py)
A1111_HIRES = """masterpiece, a red fox <lora:fox_style:0.7>
in the snow
Negative prompt: blurry, lowres
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 1.5, \
Hires steps: 12, Hires upscaler: Latent (nearest-exact), Lora hashes: "fox_style: 0123456789ab", Version: v1.10.1"""

# an img2img of A1111 before 1.9: the schedule still part of the sampler's name
A1111_IMG2IMG = """a castle
Steps: 30, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 42, Size: 640x448, Model: dreamshaper_8, \
Denoising strength: 0.55"""


def _comfy_graph() -> dict:
    """ComfyUI's default graph in API form, with a LoRA, CLIP skip 2 and a hires pass."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15/dreamshaper_8.safetensors"}},
        "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "styles/ink.safetensors",
                                                     "strength_model": 0.8, "strength_clip": 0.6}},
        "11": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["10", 1], "stop_at_clip_layer": -2}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["11", 0], "text": "a lighthouse at dusk"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["11", 0], "text": "text, watermark"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 640, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8,
                                                  "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1,
                                                  "model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                  "latent_image": ["5", 0]}},
        "12": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact",
                                                           "scale_by": 1.5}},
        "13": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 10, "cfg": 8, "sampler_name": "dpmpp_2m",
                                                   "scheduler": "karras", "denoise": 0.5, "model": ["10", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["12", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def test_a1111_hires_text_becomes_the_options_it_states():
    replay = replay_a1111(A1111_HIRES)
    assert replay.options == {
        "prompts": ("masterpiece, a red fox <lora:fox_style:0.7>\nin the snow",), "negative": "blurry, lowres",
        "steps": 28, "cfg": 6.5, "seed": 1234567890, "width": 512, "height": 768, "scheduler": "DPM++ 2M",
        "schedule": "Karras", "clip_skip": 2, "hires_scale": 1.5, "hires_steps": 12, "hires_denoise": 0.45,
        "hires_upscaler": "Latent (nearest-exact)"}
    assert replay.model == "v1-5-pruned-emaonly" and replay.notes == []


def test_a1111_img2img_text_gives_the_strength_and_asks_for_the_picture():
    replay = replay_a1111(A1111_IMG2IMG)
    assert replay.options["scheduler"] == "DPM++ SDE Karras" and "schedule" not in replay.options
    assert replay.options["denoise"] == 0.55 and "hires_scale" not in replay.options
    assert (replay.options["width"], replay.options["height"]) == (640, 448)
    assert any("--init-image" in note for note in replay.notes)


def test_comfyui_graph_is_followed_through_its_links():
    replay = replay_comfy(_comfy_graph())
    assert replay.options == {
        "prompts": ("a lighthouse at dusk <lora:ink:0.6:0.8>",), "negative": "text, watermark", "steps": 20,
        "cfg": 8, "seed": 156680208700286, "scheduler": "dpmpp_2m", "schedule": "karras", "width": 512,
        "height": 640, "clip_skip": 2, "hires_scale": 1.5, "hires_steps": 10, "hires_denoise": 0.5,
        "hires_upscaler": "Latent (nearest-exact)"}
    assert replay.model == "dreamshaper_8"


def test_comfyui_img2img_and_refusals():
    graph = _comfy_graph()
    graph["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"]["denoise"] = 0.5
    replay = replay_comfy(graph)
    # ComfyUI runs its 20 steps as the last of a 40-step schedule: 40 steps at strength 0.5
    assert replay.options["denoise"] == 0.5 and replay.options["steps"] == 40 and "width" not in replay.options
    graph["3"]["inputs"]["scheduler"] = "beta"
    with pytest.raises(SdkitError, match="beta"):
        replay_comfy(graph)
    with pytest.raises(SdkitError, match="no KSampler"):
        replay_comfy({"1": {"class_type": "SaveImage", "inputs": {}}})


def _png(path, **texts):
    info = PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_png_texts_are_told_apart_and_a_png_with_neither_is_refused(tmp_path):
    assert read_replay(_png(tmp_path / "a.png", parameters=A1111_HIRES)).source == "A1111"
    comfy = read_replay(_png(tmp_path / "c.png", prompt=json.dumps(_comfy_graph()), workflow="{}"))
    assert comfy.source == "ComfyUI" and comfy.options["steps"] == 20
    with pytest.raises(SdkitError, match="neither A1111 'parameters' nor ComfyUI 'prompt'") as caught:
        read_replay(_png(tmp_path / "n.png", Comment="hello"))
    assert "\n" not in str(caught.value)


def _sample(*args: str):
    from sdkit.cli import sample_cmd  # noqa: F401  (attaches the command)
    from sdkit.cli.main import cli

    return CliRunner().invoke(cli, ["sample", *args])


def test_sdkits_png_draws_again_pixel_for_pixel_and_options_override(sd1, tmp_path):
    first = tmp_path / "first.png"
    done = _sample(str(sd1.file), "-p", "a photo", "-n", "dark", "--steps", "3", "--width", str(SIZE),
                   "--height", str(SIZE), "--seed", "11", "--cfg", "5.5", "--sampler", "DPM++ 2M SDE",
                   "--schedule", "Karras", "--clip-skip", "2", "-o", str(first))
    assert done.exit_code == 0, done.output
    again = tmp_path / "again.png"
    done = _sample(str(sd1.file), "--from-png", str(first), "-o", str(again))
    assert done.exit_code == 0, done.output
    pictures = [Image.open(path) for path in (first, again)]
    assert np.array_equal(np.asarray(pictures[0]), np.asarray(pictures[1]))
    assert pictures[0].info["parameters"] == pictures[1].info["parameters"]
    assert "Sampler: DPM++ 2M SDE, Schedule type: Karras" in pictures[0].info["parameters"]
    other = tmp_path / "other.png"
    done = _sample(str(sd1.file), "--from-png", str(first), "--seed", "12", "-o", str(other))
    assert done.exit_code == 0, done.output
    text = Image.open(other).info["parameters"]
    assert "Seed: 12," in text and "Steps: 3," in text and "Negative prompt: dark" in text


def test_from_png_refusals_are_one_line_and_write_nothing(sd1, tmp_path):
    out = tmp_path / "x.png"
    plain = _png(tmp_path / "plain.png")
    done = _sample(str(sd1.file), "--from-png", str(plain), "-o", str(out))
    assert done.exit_code == 1 and "neither" in str(done.exception) and not out.exists()
    named = _png(tmp_path / "named.png", parameters="a photo\nSteps: 2, Sampler: DPM fast, CFG scale: 7, Seed: 1")
    done = _sample(str(sd1.file), "--from-png", str(named), "-o", str(out))
    assert done.exit_code == 1 and "'DPM fast' has no diffusers equivalent" in str(done.exception)
    assert not out.exists()
    done = _sample(str(sd1.file), "-o", str(out))
    assert done.exit_code == 1 and "no prompt given" in str(done.exception)


def test_a_model_other_than_the_pngs_is_noted():
    from sdkit.runtime.sample.replay import model_note

    replay = replay_a1111(A1111_HIRES)  # Model hash: 6ce0161689, Model: v1-5-pruned-emaonly
    same = "p\nSteps: 2, Sampler: Euler, Seed: 1, Model hash: 6CE0161689, Model: renamed"
    assert model_note(replay, "renamed.safetensors", same) is None
    other = "p\nSteps: 2, Sampler: Euler, Seed: 1, Model hash: 0123456789, Model: mine"
    note = model_note(replay, "mine.safetensors", other)
    assert "6ce0161689" in note and "0123456789" in note and "v1-5-pruned-emaonly" in note
    comfy = replay_comfy(_comfy_graph())  # no hash: told by name
    assert "dreamshaper_8" in model_note(comfy, "x", "p\nSteps: 2, Sampler: Euler, Seed: 1, Model: x")
    assert model_note(comfy, "x", "p\nSteps: 2, Sampler: Euler, Seed: 1, Model: dreamshaper_8") is None
