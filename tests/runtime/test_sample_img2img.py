"""img2img and A1111's hires fix on the toy SD1 model: what denoising strength does to
the picture and to the steps run, hires sizes, and hires PNGs drawn again exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sdkit.errors import SdkitError
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample.img2img import Hires, hires_schedule
from sdkit.runtime.sample.sampler import Sampler, Settings

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "sd1" / "diffusers"
SIZE = 32  # the toy model's native size

pytestmark = pytest.mark.skipif(not (TOY / "model_index.json").is_file(),
                                reason="toy fixtures not built (make fixtures)")


@pytest.fixture(scope="module")
def sampler() -> Sampler:
    return Sampler(load_model(TOY))


def _stripes(tmp_path: Path, colours: tuple[tuple[int, int, int], ...], name: str) -> str:
    """A picture of vertical stripes, one per colour."""
    picture = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    for index, colour in enumerate(colours):
        picture[:, index * SIZE // len(colours):(index + 1) * SIZE // len(colours)] = colour
    path = tmp_path / name
    Image.fromarray(picture).save(path)
    return str(path)


def _draw(sampler: Sampler, steps_seen: list | None = None, **settings) -> np.ndarray:
    progress = (lambda done, total: steps_seen.append(done)) if steps_seen is not None else None
    values = {"steps": 10, "cfg": 6.0, "seed": 4, "scheduler": "euler", **settings}
    sample = sampler.generate(sampler.plan_prompt("a red circle"), Settings(**values), progress=progress)[0]
    return np.asarray(sample.image, dtype=np.int16)


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def _toy_picture(sampler: Sampler, tmp_path: Path, prompt: str, seed: int) -> str:
    """A picture the toy model drew (its VAE knows its own shapes, not arbitrary pictures)."""
    sample = sampler.generate(sampler.plan_prompt(prompt), Settings(steps=8, cfg=6.0, seed=seed, scheduler="ddim"))[0]
    path = tmp_path / f"{seed}.png"
    sample.image.save(path)
    return str(path)


def test_small_denoise_stays_near_the_init_image_and_full_denoise_ignores_it(sampler, tmp_path):
    red = _toy_picture(sampler, tmp_path, "a red circle", 1)
    blue = _toy_picture(sampler, tmp_path, "a blue triangle", 2)
    init = np.asarray(Image.open(red), dtype=np.int16)
    light = _draw(sampler, init_image=red, denoise=0.2)
    heavy = _draw(sampler, init_image=red, denoise=0.9)
    assert _distance(light, init) < 10 < _distance(heavy, init)
    assert _distance(light, init) * 3 < _distance(_draw(sampler, init_image=blue, denoise=0.2), init)
    full = [_draw(sampler, init_image=path, denoise=1.0) for path in (red, blue)]
    assert np.array_equal(full[0], full[1])  # nothing of either picture is left
    assert np.array_equal(full[0], _draw(sampler, width=SIZE, height=SIZE))  # the text-to-image picture


@pytest.mark.parametrize("scheduler", ["euler", "DPM++ 2M Karras", "DDIM", "UniPC"])
@pytest.mark.parametrize("steps, denoise", [(10, 0.35), (20, 0.5), (7, 0.99), (10, 0.05)])
def test_denoise_runs_the_steps_a1111_runs(sampler, tmp_path, scheduler, steps, denoise):
    """A1111 (setup_img2img_steps, "fix steps" off): t_enc = int(steps * min(denoise, 0.999));
    its k-diffusion samplers run sigmas[steps - t_enc - 1:], t_enc + 1 steps, its timestep
    samplers (DDIM, PLMS, UniPC) timesteps[:t_enc]."""
    init = _stripes(tmp_path, ((200, 200, 200),), "g.png")
    encoded = int(steps * min(denoise, 0.999))
    expected = encoded if scheduler in ("DDIM", "UniPC") else encoded + 1
    settings = {"init_image": init, "denoise": denoise, "steps": steps, "scheduler": scheduler}
    if expected == 0:
        with pytest.raises(SdkitError, match="runs no step"):
            _draw(sampler, **settings)
        return
    seen: list[int] = []
    _draw(sampler, seen, **settings)
    assert len(seen) == expected


@pytest.mark.parametrize("steps, denoise", [(10, 0.7), (4, 0.3), (15, 1.0), (3, 0.45)])
def test_hires_pass_runs_exactly_its_steps(sampler, steps, denoise):
    length, strength = hires_schedule(steps, denoise)
    assert length == max(int(steps / min(denoise, 0.999)), steps)  # A1111: steps / denoise in all
    assert min(int(length * strength), length) == steps  # what diffusers' img2img then runs
    seen: list[int] = []
    _draw(sampler, seen, width=SIZE, height=SIZE, steps=5, hires=Hires(1.5, steps, denoise))
    assert seen[:5] == [1, 2, 3, 4, 5] and seen[5:] == list(range(1, steps + 1))


@pytest.mark.parametrize("upscaler, scale, size", [("latent", 2.0, 64), ("Lanczos", 1.5, 48),
                                                   ("Latent (bicubic antialiased)", 1.25, 40)])
def test_hires_output_has_the_scaled_size_and_its_png_draws_again(tmp_path, upscaler, scale, size):
    from sdkit.cli import sample_cmd  # noqa: F401  (attaches the command)
    from sdkit.cli.main import cli

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    runner = CliRunner()
    done = runner.invoke(cli, ["sample", str(TOY), "-p", "a red square", "--steps", "4", "--seed", "9",
                               "--hires-scale", str(scale), "--hires-steps", "3", "--hires-denoise", "0.6",
                               "--hires-upscaler", upscaler, "-o", str(first)])
    assert done.exit_code == 0, done.output
    picture = Image.open(first)
    assert picture.size == (size, size)
    text = picture.info["parameters"]
    for field in (f"Size: {SIZE}x{SIZE}", "Denoising strength: 0.6", f"Hires upscale: {scale:g}", "Hires steps: 3",
                  "Hires upscaler: " + {"latent": "Latent"}.get(upscaler, upscaler)):
        assert field in text
    done = runner.invoke(cli, ["sample", str(TOY), "--from-png", str(first), "-o", str(again)])
    assert done.exit_code == 0, done.output
    assert np.array_equal(np.asarray(picture), np.asarray(Image.open(again)))


def test_img2img_png_names_its_strength(sampler, tmp_path):
    init = _stripes(tmp_path, ((10, 200, 10),), "g.png")
    sample = sampler.generate(sampler.plan_prompt("a green circle"),
                              Settings(steps=4, init_image=init, denoise=0.5, scheduler="DPM++ 2M Karras"))[0]
    assert sample.image.size == (SIZE, SIZE)
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in sample.parameters
    assert f"Size: {SIZE}x{SIZE}" in sample.parameters and "Denoising strength: 0.5" in sample.parameters
    assert "Hires" not in sample.parameters


@pytest.mark.parametrize("settings, expected", [
    (Settings(init_image="x.png", denoise=0.0), "--denoise must be above 0"),
    (Settings(init_image="x.png", denoise=1.5), "--denoise must be above 0 and at most 1"),
    (Settings(init_image="x.png", denoise=0.05, steps=10, scheduler="ddim"), "runs no step with DDIM"),
    (Settings(hires=Hires(0)), "--hires-scale must be above 0"),
    (Settings(hires=Hires(2, denoise=2)), "--hires-denoise"),
    (Settings(hires=Hires(2, upscaler="ESRGAN")), "unknown hires upscaler 'ESRGAN'"),
    (Settings(init_image="x.png", hires=Hires(2)), "not to --init-image"),
])
def test_bad_img2img_and_hires_settings_are_refused_in_one_line(sampler, settings, expected):
    with pytest.raises(SdkitError, match=expected) as caught:
        sampler.generate(sampler.plan_prompt("a"), settings)
    assert "\n" not in str(caught.value)


def test_an_init_image_size_the_vae_cannot_take_is_refused(sampler, tmp_path):
    odd = tmp_path / "odd.png"
    Image.new("RGB", (33, 32)).save(odd)
    with pytest.raises(SdkitError, match=r"the init image's width 33: must be a positive multiple of \d+ "):
        sampler.generate(sampler.plan_prompt("a"), Settings(init_image=str(odd), denoise=0.5))


@pytest.mark.parametrize("extra", [{"denoise": 0.6}, {"hires": Hires(1.5, 3, 0.5)}])
def test_picture_i_of_a_batch_is_the_single_picture_of_seed_plus_i(sampler, tmp_path, extra):
    if "denoise" in extra:
        extra = {**extra, "init_image": _toy_picture(sampler, tmp_path, "a red circle", 1)}
    plan = sampler.plan_prompt("a red circle")
    batch = sampler.generate(plan, Settings(steps=6, seed=3, scheduler="euler-a", **extra), count=2)
    single = sampler.generate(plan, Settings(steps=6, seed=4, scheduler="euler-a", **extra))[0]
    difference = np.abs(np.asarray(batch[1].image, dtype=np.int16) - np.asarray(single.image, dtype=np.int16))
    assert difference.max() <= 1  # batched matmuls may round differently
    assert "Seed: 4," in batch[1].parameters
