"""Full-size single files load for sampling with no --config and an empty, offline
Hugging Face cache: tokenizers and scheduler come from what sdkit ships.

The checkpoints are header-only (full_size_sd.py): real names and shapes, weights that
read as zeros from a sparse file, so building the pipeline reads almost nothing. The file
hash, which would read every byte, is left out of these loads.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import Future

import pytest
from full_size_sd import write_full_size_checkpoint
from offline_hub import use_empty_hub_cache

from sdkit.errors import SdkitError
from sdkit.runtime import pipeline
from sdkit.runtime.pipeline import load_model

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" (Bumblebee's CLIP tokenizer test)
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "_hash_in_background", lambda path: Future())
    return use_empty_hub_cache(monkeypatch, tmp_path / "hf-cache")


def _padded(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length).input_ids


def _check_schedule(config, prediction: str, zero_snr: bool) -> None:
    assert {key: config[key] for key in SCHEDULE} == SCHEDULE
    assert config["prediction_type"] == prediction
    assert config.get("rescale_betas_zero_snr", False) is zero_snr


def test_full_size_sd15_single_file_builds_offline_without_config(offline, tmp_path):
    path = write_full_size_checkpoint(tmp_path / "sd15.safetensors", "sd15")
    model = load_model(path, device="cpu", dtype="fp16")
    assert type(model.pipe).__name__ == "StableDiffusionPipeline" and model.default_size == 512
    assert _padded(model.pipe.tokenizer, "a photo of a cat") == CAT + [49407] * 70
    assert model.pipe.text_encoder.config.eos_token_id == 49407
    _check_schedule(model.scheduler_config, "epsilon", zero_snr=False)


def test_full_size_sd21_768_v_single_file_builds_offline(offline, tmp_path):
    path = write_full_size_checkpoint(tmp_path / "sd21.safetensors", "sd21",
                                      metadata={"modelspec.prediction_type": "v"})
    model = load_model(path, device="cpu", dtype="fp16")
    assert model.family == "sd2" and model.default_size == 768
    assert _padded(model.pipe.tokenizer, "a photo of a cat") == CAT + [0] * 70  # OpenCLIP pads with `!`
    _check_schedule(model.scheduler_config, "v_prediction", zero_snr=False)


def test_full_size_sdxl_v_pred_ztsnr_single_file_builds_offline(offline, tmp_path):
    path = write_full_size_checkpoint(tmp_path / "sdxl.safetensors", "sdxl", markers=("v_pred", "ztsnr"))
    model = load_model(path, device="cpu", dtype="fp16")
    assert type(model.pipe).__name__ == "StableDiffusionXLPipeline" and model.default_size == 1024
    assert _padded(model.pipe.tokenizer, "a photo of a cat") == CAT + [49407] * 70
    assert _padded(model.pipe.tokenizer_2, "a photo of a cat") == CAT + [0] * 70
    _check_schedule(model.scheduler_config, "v_prediction", zero_snr=True)


def test_a_toy_vocabulary_asks_for_config_in_one_line(offline, sd1, tmp_path):
    import shutil

    lone = tmp_path / "lone.safetensors"
    shutil.copyfile(sd1.file, lone)  # no companion tokenizer folder beside it
    with pytest.raises(SdkitError) as caught:
        load_model(lone)
    message = str(caught.value)
    assert "\n" not in message and "--config" in message and "1000 token rows" in message


@pytest.mark.slow
def test_sample_command_draws_from_a_full_size_sd15_file_offline(offline, tmp_path):
    """`sdkit sample` as a user runs it: its own process, the hub cache empty and offline."""
    import os

    path = write_full_size_checkpoint(tmp_path / "sd15.safetensors", "sd15")
    output = tmp_path / "out.png"
    done = subprocess.run([sys.executable, "-m", "sdkit", "sample", str(path), "-p", "a photo of a cat",
                           "--steps", "1", "--width", "64", "--height", "64", "--dtype", "bf16",  # half the memory
                           "-o", str(output)],
                          env={**os.environ, **offline}, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    from PIL import Image

    assert Image.open(output).size == (64, 64)
