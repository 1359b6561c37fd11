"""The toy models drawn through `sdkit sample`: the picture shows the colour asked for,
from the diffusers folder and from the single file alike, and an SDXL picture is the one
diffusers' own pipeline draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample.sampler import Sampler, Settings
from sdkit.runtime.toyscore import IMAGE_SIZE, score_image

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy"
# cases of the builder's palette evaluation (fixtures/toy/toy_eval.py: "a {colour} {shape}",
# 20 steps, guidance 6, seeds 0 and 1, the scheduler each model ships with)
ASKED = [("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "cross")]
SCHEDULER = {"sd1": "ddim", "sdxl": "euler"}  # the schedulers the toy models ship with

pytestmark = pytest.mark.skipif(not (TOY / "sd1" / "diffusers" / "model_index.json").is_file(),
                                reason="toy fixtures not built (make fixtures)")


def _load(model: str, form: str):
    folder = TOY / model / "diffusers"
    if form == "folder":
        return load_model(folder)
    return load_model(TOY / model / f"toy-{model}.safetensors", config=folder)


def _settings(model: str, seed: int = 0) -> Settings:
    return Settings(steps=20, cfg=6.0, seed=seed, width=IMAGE_SIZE, height=IMAGE_SIZE, scheduler=SCHEDULER[model])


@pytest.mark.parametrize("model, form", [("sd1", "folder"), ("sd1", "file"), ("sdxl", "folder"), ("sdxl", "file")])
def test_toy_sample_shows_the_asked_colour(model, form):
    sampler = Sampler(_load(model, form))
    found = []
    for colour, shape in ASKED:
        for sample in sampler.generate(sampler.plan_prompt(f"a {colour} {shape}"), _settings(model), count=2):
            found.append((colour, score_image(sample.image).colour))
    assert sum(asked == seen for asked, seen in found) >= len(found) - 1, found


@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_toy_single_file_draws_the_folders_picture(model):
    pictures = []
    for form in ("folder", "file"):
        sampler = Sampler(_load(model, form))
        sample = sampler.generate(sampler.plan_prompt("a blue square"), _settings(model, seed=3))[0]
        pictures.append(np.asarray(sample.image, dtype=np.int16))
    assert np.abs(pictures[0] - pictures[1]).max() <= 2  # the single file stores fp16 weights


def test_toy_sdxl_draws_what_diffusers_draws_without_a_negative_prompt():
    """No negative prompt means SDXL's zeroed unconditional pass (the one the model was
    trained with), not the encoding of an empty text."""
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(TOY / "sdxl" / "diffusers", local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    settings = _settings("sdxl", seed=5)
    with torch.no_grad():
        theirs = reference("a green cross", num_inference_steps=settings.steps, guidance_scale=settings.cfg,
                           width=IMAGE_SIZE, height=IMAGE_SIZE,
                           generator=torch.Generator().manual_seed(settings.seed)).images[0]
    sampler = Sampler(_load("sdxl", "folder"))
    ours = sampler.generate(sampler.plan_prompt("a green cross"), settings)[0].image
    difference = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
    assert difference.max() <= 1
