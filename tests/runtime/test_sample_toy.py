"""The toy models drawn through `sdkit sample`: the picture shows the colour asked for,
from the diffusers folder and from the single file alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample import Sampler, Settings
from sdkit.runtime.toyscore import IMAGE_SIZE, score_image

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy"
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


_SDXL_MARGINAL = pytest.mark.xfail(strict=False, reason="toy-sdxl draws the asked colour in about 87% "
                                   "of its build evaluation, so 7 of these 8 is not assured")


@pytest.mark.parametrize("model, form", [("sd1", "folder"), ("sd1", "file"),
                                         pytest.param("sdxl", "folder", marks=_SDXL_MARGINAL),
                                         pytest.param("sdxl", "file", marks=_SDXL_MARGINAL)])
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
