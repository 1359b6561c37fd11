"""img2img and hires fix on the transformer families: toy-flux draws the picture diffusers'
FluxImg2ImgPipeline draws from the same init image, seed, steps, strength and guidance; a
denoise near 0 gives the init image back and 1 ignores it; the hires pass is that
pipeline run on the enlarged first picture; the PNG records both as A1111 does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample.img2img import Hires
from sdkit.runtime.sample.sampler import Sampler, Settings
from sdkit.runtime.toyscore import IMAGE_SIZE

FOLDER = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "flux" / "diffusers"
CFG = 6.0  # toy-flux has no guidance embedder: real CFG against the empty negative prompt

pytestmark = pytest.mark.skipif(not (FOLDER / "model_index.json").is_file(),
                                reason="toy-flux not built (make fixtures)")


@pytest.fixture(scope="module")
def sampler() -> Sampler:
    return Sampler(load_model(FOLDER, flow=True))


@pytest.fixture(scope="module")
def init_png(sampler, tmp_path_factory) -> Path:
    """A red circle drawn by toy-flux, the picture the img2img tests start from."""
    path = tmp_path_factory.mktemp("init") / "red.png"
    sampler.generate(sampler.plan_prompt("a red circle"), Settings(steps=4, cfg=CFG, seed=1))[0].image.save(path)
    return path


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _reference(name: str):
    import diffusers

    pipe = getattr(diffusers, name).from_pretrained(FOLDER, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_img2img(image, prompt: str, seed: int, steps: int, strength: float) -> np.ndarray:
    with torch.no_grad():
        picture = _reference("FluxImg2ImgPipeline")(
            prompt, image=image, negative_prompt="", true_cfg_scale=CFG, num_inference_steps=steps,
            strength=strength, height=image.height, width=image.width, max_sequence_length=16,
            generator=torch.Generator().manual_seed(seed)).images[0]
    return _pixels(picture)


def test_img2img_draws_what_diffusers_img2img_draws(sampler, init_png):
    settings = Settings(steps=6, cfg=CFG, seed=2, init_image=str(init_png), denoise=0.6)
    sample = sampler.generate(sampler.plan_prompt("a blue square"), settings)[0]
    theirs = _diffusers_img2img(Image.open(init_png).convert("RGB"), "a blue square", 2, 6, 0.6)
    assert np.abs(_pixels(sample.image) - theirs).max() <= 1
    assert f"Size: {IMAGE_SIZE}x{IMAGE_SIZE}, Model: diffusers, Denoising strength: 0.6, " in sample.parameters


def test_denoise_near_0_keeps_the_init_image_and_1_ignores_it(sampler, init_png):
    init = _pixels(Image.open(init_png))
    plan = sampler.plan_prompt("a blue square")
    kept = sampler.generate(plan, Settings(steps=20, cfg=1.0, seed=2, init_image=str(init_png), denoise=0.05))[0]
    ignored = sampler.generate(plan, Settings(steps=4, cfg=1.0, seed=2, init_image=str(init_png), denoise=1.0))[0]
    drawn = sampler.generate(plan, Settings(steps=4, cfg=1.0, seed=2))[0]
    # one step from the schedule's smallest noise level: the VAE's round trip and a little
    assert np.abs(_pixels(kept.image) - init).mean() < 15
    assert np.abs(_pixels(ignored.image) - init).mean() > 40
    assert np.array_equal(_pixels(ignored.image), _pixels(drawn.image))


def test_hires_fix_redraws_the_enlarged_picture_as_diffusers_img2img(sampler):
    settings = Settings(steps=4, cfg=CFG, seed=3, hires=Hires(2.0, steps=5, denoise=0.5, upscaler="lanczos"))
    sample = sampler.generate(sampler.plan_prompt("a green cross"), settings)[0]
    with torch.no_grad():
        first = _reference("FluxPipeline")("a green cross", negative_prompt="", true_cfg_scale=CFG,
                                           num_inference_steps=4, height=IMAGE_SIZE, width=IMAGE_SIZE,
                                           max_sequence_length=16, generator=torch.Generator().manual_seed(3)).images[0]
    enlarged = first.resize((2 * IMAGE_SIZE, 2 * IMAGE_SIZE), Image.Resampling.LANCZOS)
    assert sample.image.size == enlarged.size
    assert np.abs(_pixels(sample.image) - _diffusers_img2img(enlarged, "a green cross", 3, 5, 0.5)).max() <= 1
    assert (f"Size: {IMAGE_SIZE}x{IMAGE_SIZE}, Model: diffusers, Denoising strength: 0.5, Hires upscale: 2, "
            "Hires steps: 5, Hires upscaler: Lanczos, ") in sample.parameters


def test_latent_upscalers_enlarge_the_flow_models_pixels(sampler):
    """FLUX.1's latents are packed into tokens: "Latent" interpolates the decoded picture."""
    settings = Settings(steps=2, cfg=1.0, seed=4, hires=Hires(1.5, denoise=0.5))
    sample = sampler.generate(sampler.plan_prompt("a red circle"), settings)[0]
    assert sample.image.size == (48, 48)
    assert "Hires upscale: 1.5, Hires upscaler: Latent, " in sample.parameters
