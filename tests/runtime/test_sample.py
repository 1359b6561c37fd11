"""Sampling: reproducibility by seed, batches, schedulers, CLIP skip, sizes, files, CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from runtime_models import SIZE, STEPS, draw, max_difference, pixels
from sdkit.errors import SdkitError
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample.plan import AdapterArgs
from sdkit.runtime.sample.sampler import Settings, sdxl_clip_skip
from sdkit.runtime.sample.run import SampleJob, output_paths, run_sample
from sdkit.runtime.sample.scheduler import SHORT_NAMES, resolve_sampler

TINY = Settings(steps=STEPS, cfg=6.0, seed=3, width=SIZE, height=SIZE)


@pytest.fixture(scope="module")
def model(sd1):
    return load_model(sd1.file)


def test_same_seed_and_settings_write_the_same_bytes(sd1, tmp_path):
    job = SampleJob(model=str(sd1.file), prompts=["a photo"], settings=TINY)
    first = run_sample(job, tmp_path / "a.png").outputs[0]
    second = run_sample(job, tmp_path / "b.png").outputs[0]
    assert first.read_bytes() == second.read_bytes()
    other = run_sample(SampleJob(model=str(sd1.file), prompts=["a photo"], settings=Settings(
        steps=STEPS, cfg=6.0, seed=4, width=SIZE, height=SIZE)), tmp_path / "c.png").outputs[0]
    assert other.read_bytes() != first.read_bytes()


def test_picture_i_of_a_batch_is_the_single_picture_of_seed_plus_i(model):
    batch = draw(model, "a photo", count=3, seed=10, scheduler="euler-a")
    for index in range(3):
        single = draw(model, "a photo", seed=10 + index, scheduler="euler-a")[0]
        assert max_difference(batch[index], single) <= 1  # batched matmuls may round differently
    assert max_difference(batch[0], batch[1]) > 10


@pytest.mark.parametrize("name", sorted(SHORT_NAMES))
def test_every_scheduler_draws_from_the_models_schedule(model, name):
    from sdkit.runtime.sample.scheduler import make_scheduler

    scheduler = make_scheduler(name, model.scheduler_config)
    assert type(scheduler).__name__ == resolve_sampler(name).scheduler
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012
    if "use_karras_sigmas" in scheduler.config:
        assert scheduler.config.use_karras_sigmas is name.endswith("-karras")
    picture = draw(model, "a photo", scheduler=name, steps=2)[0]
    assert picture.shape == (SIZE, SIZE, 3) and picture.std() > 1


def _a1111_embeds(pipe, text: str, skip: int) -> torch.Tensor:
    """A1111's CLIP skip: hidden state `skip` layers from the end, then the final norm."""
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-skip]
        return getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm(hidden)


def test_clip_skip_two_reads_the_penultimate_layer_through_the_final_norm(model):
    from sdkit.runtime.sample.scheduler import make_scheduler

    pipe = model.pipe
    pipe.scheduler = make_scheduler("euler", model.scheduler_config)
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn((1, 4, 16, 16), generator=generator)
    with torch.no_grad():
        expected = pipe(prompt_embeds=_a1111_embeds(pipe, "a photo", 2),
                        negative_prompt_embeds=_a1111_embeds(pipe, "", 2), num_inference_steps=STEPS,
                        guidance_scale=6.0, width=SIZE, height=SIZE, latents=latents, generator=generator,
                        output_type="pil").images[0]
    ours = draw(model, "a photo", seed=3, clip_skip=2, scheduler="euler")[0]
    assert max_difference(ours, pixels(expected)) <= 1
    assert max_difference(ours, draw(model, "a photo", seed=3, scheduler="euler")[0]) > 5


def test_clip_skip_range_and_sdxl_mapping(model):
    assert sdxl_clip_skip(1) is None and sdxl_clip_skip(2) is None and sdxl_clip_skip(4) == 2
    with pytest.raises(SdkitError, match="between 1 and 3") as caught:
        draw(model, "a photo", clip_skip=4)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("settings, expected", [
    (Settings(width=33, height=SIZE), "multiple of 2"), (Settings(steps=0, width=SIZE, height=SIZE), "--steps"),
    (Settings(scheduler="nope", width=SIZE, height=SIZE), "unknown scheduler"),
])
def test_bad_settings_are_refused_in_one_line(model, settings, expected):
    with pytest.raises(SdkitError, match=expected) as caught:
        draw(model, "a photo", **{k: getattr(settings, k) for k in ("width", "steps", "scheduler")})
    assert "\n" not in str(caught.value)


def test_sdxl_samples_and_its_batch_follows_seeds(sdxl):
    model = load_model(sdxl.file)
    pictures = draw(model, "a photo", count=2, seed=5)
    assert pictures[0].shape == (SIZE, SIZE, 3)
    assert max_difference(pictures[1], draw(model, "a photo", seed=6)[0]) <= 1


def test_several_pictures_get_numbered_files_and_nothing_is_overwritten(sd1, tmp_path):
    assert output_paths(tmp_path / "x.png", 1) == [tmp_path / "x.png"]
    assert [p.name for p in output_paths(tmp_path / "x.png", 12)][:2] == ["x-00.png", "x-01.png"]
    job = SampleJob(model=str(sd1.file), prompts=["a photo", "cat"], settings=TINY, batch=2)
    result = run_sample(job, tmp_path / "out.png")
    assert [p.name for p in result.outputs] == ["out-0.png", "out-1.png", "out-2.png", "out-3.png"]
    assert [s.seed for s in result.samples] == [3, 4, 3, 4]
    before = result.outputs[2].read_bytes()
    with pytest.raises(SdkitError, match="already exists"):
        run_sample(job, tmp_path / "out.png")
    assert result.outputs[2].read_bytes() == before
    with pytest.raises(SdkitError, match=".png"):
        run_sample(job, tmp_path / "out.jpg")


def test_cli_writes_a_png_and_reports_errors_in_one_line(sd1, tmp_path):
    from sdkit.cli import sample_cmd  # noqa: F401  (attaches the command)
    from sdkit.cli.main import cli

    runner = CliRunner()
    args = ["sample", str(sd1.file), "-p", "a photo", "--steps", "2", "--width", "32", "--height", "32",
            "--seed", "7", "-o", str(tmp_path / "cli.png")]
    done = runner.invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert (tmp_path / "cli.png").is_file()
    from PIL import Image
    assert Image.open(tmp_path / "cli.png").info["parameters"].splitlines()[-1].startswith("Steps: 2,")
    refused = runner.invoke(cli, args[:-2] + ["--lora", str(tmp_path / "missing.safetensors"),
                                              "-o", str(tmp_path / "x.png")])
    assert refused.exit_code == 1 and isinstance(refused.exception, SdkitError)
    assert "missing.safetensors" in str(refused.exception) and not (tmp_path / "x.png").exists()


def test_cli_error_line_and_exit_code(sd1, tmp_path, capsys):
    from sdkit.cli import sample_cmd  # noqa: F401
    from sdkit.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["sample", str(sd1.file), "-p", "x", "--width", "31", "-o", str(tmp_path / "y.png")])
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdkit: error: --width 31")


def test_default_size_is_the_models_native_size(sd1):
    folder_model = load_model(sd1.folder)
    assert folder_model.default_size == 16 * 2  # sample_size 16 latents, VAE factor 2
    assert np.asarray(draw(folder_model, "a photo", width=None, height=None)[0]).shape == (32, 32, 3)


def test_missing_adapters_are_reported_before_any_model_loads(tmp_path):
    absent_model = str(tmp_path / "absent.safetensors")
    for job, expected in (
            (SampleJob(model=absent_model, prompts=["a"], adapters=AdapterArgs(loras=["x.safetensors"])), "--lora"),
            (SampleJob(model=absent_model, prompts=["a"], vae=str(tmp_path / "v.pt")), "--vae"),
            (SampleJob(model=absent_model, prompts=["a"], settings=Settings(steps=0)), "--steps")):
        with pytest.raises(SdkitError, match=expected):
            run_sample(job, tmp_path / "out.png")


TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy"


@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_a_file_whose_sizes_need_config_says_so_in_one_line(model, tmp_path, capsys):
    """The toy models' widths (16, 32, 48 channels) take norm groups of 8, which no tensor
    records: built with the released models' 32 groups they cannot exist at all."""
    from sdkit.cli import sample_cmd  # noqa: F401
    from sdkit.cli.main import main

    source, folder = TOY / model / f"toy-{model}.safetensors", TOY / model / "diffusers"
    if not source.is_file() or not folder.is_dir():
        pytest.skip("toy fixtures not built (fixtures/toy/build.py)")
    lone = tmp_path / source.name
    shutil.copyfile(source, lone)
    for tokenizer in ("tokenizer", "tokenizer_2"):  # a companion folder: the tokenizers are not what is missing
        if (folder / tokenizer).is_dir():
            shutil.copytree(folder / tokenizer, tmp_path / f"{source.name}.tokenizer" / tokenizer)
    with pytest.raises(SdkitError) as caught:
        load_model(lone, device="cpu")
    message = str(caught.value)
    assert "--config" in message and "norm_num_groups" in message and "\n" not in message
    assert "block_out_channels" in message and "stock" in message  # the size that is not the released one
    with pytest.raises(SystemExit) as exited:
        main(["sample", str(lone), "-p", "a red circle", "--steps", "1", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 1 and len(err) == 1 and err[0].startswith(f"sdkit: error: {lone}: ")
    assert "ValueError" not in err[0] and not (tmp_path / "x.png").exists()
    assert load_model(lone, config=folder, device="cpu").pipe.unet.config.norm_num_groups == 8
