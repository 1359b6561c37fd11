"""Sampling benchmarks: `sdkit sample`'s runtime against a plain diffusers pipeline on the
same model and settings, as a ratio measured in the same run.

- CPU: the toy SD1 model (fixtures/toy), pictures per second at its native 32x32.
- GPU (skipped without CUDA): SD1.5-shaped at 512x512 and SDXL-shaped at 1024x1024,
  random weights built from the real configs (nothing downloaded), 20 steps, Euler a,
  fp16: denoising iterations per second and peak memory. Also runnable on its own:

      python tests/bench/test_bench_sample.py --device cuda --models sd15,sdxl --steps 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))  # the tokenizer writer, full-size shapes

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "sd1" / "diffusers"
PROMPT = "a red circle"

# real model shapes (diffusers / transformers configs of SD1.5 and SDXL base)
from full_size_sd import CLIP_BIG_G, CLIP_L, UNETS, VAE

SD15_UNET = UNETS["sd15"]  # the rest are UNet2DConditionModel's defaults
SDXL_UNET = UNETS["sdxl"]


# ---- timing ------------------------------------------------------------------------------

class StepClock:
    """Times the denoising loop from per-step callbacks (the first step is warm-up)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def tick(self, *_: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def diffusers_callback(self, _pipe: Any, _step: int, _t: Any, tensors: dict) -> dict:
        self.tick()
        return tensors

    @property
    def iterations_per_second(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def _peak_memory(action: Callable[[], None]) -> float:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    action()
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def sdkit_run(folder: Path, device: str, size: int, steps: int, cfg: float) -> tuple[StepClock, float, float]:
    """(step clock, seconds per picture, peak GiB) of sdkit's sampler on `folder`."""
    from sdkit.runtime.pipeline import load_model
    from sdkit.runtime.sample.sampler import Sampler, Settings

    sampler = Sampler(load_model(folder, device=device))
    plan = sampler.plan_prompt(PROMPT)
    settings = Settings(steps=steps, cfg=cfg, seed=1, width=size, height=size, scheduler="euler-a")
    sampler.generate(plan, settings)  # warm-up
    clock = StepClock()
    started = time.perf_counter()
    peak = _peak_memory(lambda: sampler.generate(plan, settings, progress=clock.tick))
    return clock, time.perf_counter() - started, peak


def diffusers_run(folder: Path, device: str, size: int, steps: int, cfg: float,
                  dtype: torch.dtype) -> tuple[StepClock, float, float]:
    """The same with diffusers' own `from_pretrained` pipeline, as its docs show."""
    from diffusers import DiffusionPipeline, EulerAncestralDiscreteScheduler

    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to(device)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def run(callback: Any = None) -> None:
        generator = torch.Generator("cpu").manual_seed(1)
        pipe(PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=cfg, width=size, height=size,
             generator=generator, callback_on_step_end=callback)

    run()
    clock = StepClock()
    started = time.perf_counter()
    peak = _peak_memory(lambda: run(clock.diffusers_callback))
    return clock, time.perf_counter() - started, peak


def report(name: str, ours: tuple[StepClock, float, float], theirs: tuple[StepClock, float, float]) -> None:
    print(f"\nsample: {name}")
    for label, (clock, seconds, peak) in (("diffusers pipeline (baseline)", theirs), ("sdkit Sampler", ours)):
        memory = f"  peak {peak:5.2f} GiB" if peak else ""
        print(f"  {label:<30} {clock.iterations_per_second:7.2f} it/s  {seconds:7.2f} s/picture{memory}")
    ratio = ours[0].iterations_per_second / theirs[0].iterations_per_second
    print(f"  sdkit / diffusers: {ratio:.2f}x iterations per second")


# ---- CPU: the toy model ------------------------------------------------------------------

@pytest.mark.skipif(not (TOY / "model_index.json").is_file(), reason="toy fixtures not built (make fixtures)")
def test_bench_toy_pictures_per_second_cpu() -> None:
    from sdkit.runtime.pipeline import load_model
    from sdkit.runtime.sample.sampler import Sampler, Settings

    count, size = 10, 32
    sampler = Sampler(load_model(TOY, device="cpu"))
    plan = sampler.plan_prompt(PROMPT)
    settings = Settings(steps=20, cfg=6.0, seed=0, width=size, height=size)
    sampler.generate(plan, settings)
    started = time.perf_counter()
    for seed in range(count):
        sampler.generate(plan, Settings(steps=20, cfg=6.0, seed=seed, width=size, height=size))
    ours = count / (time.perf_counter() - started)
    theirs = 1 / diffusers_run(TOY, "cpu", size, 20, 6.0, torch.float32)[1]
    print(f"\nsample: toy-sd1 on CPU, 20 steps, {size}x{size} (load average {os.getloadavg()[0]:.1f})")
    print(f"  diffusers pipeline (baseline)  {theirs:6.2f} pictures/s")
    print(f"  sdkit Sampler                  {ours:6.2f} pictures/s  ({ours / theirs:.2f}x)")


@pytest.mark.skipif(not (TOY / "model_index.json").is_file(), reason="toy fixtures not built (make fixtures)")
@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_bench_prompt_conditioning_cpu(model: str) -> None:
    """A1111 prompt conditioning (chunks, weights, schedule) against diffusers' own
    `encode_prompt` of the same plain text; best of 7, interleaved."""
    from sdkit.runtime.pipeline import load_model
    from sdkit.runtime.sample.text_inputs import scheduled_text

    family = "sd1" if model == "sd1" else "sdxl-base"
    pipe = load_model(TOY.parents[1] / model / "diffusers", device="cpu").pipe
    long_prompt = "a (red:1.2) circle, [blue] square BREAK " + "green, " * 40 + "[cat:dog:0.5] [x|y]"
    runs = {
        "diffusers encode_prompt (baseline)": lambda: pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt="blurry"),
        "sdkit, the same plain prompt": lambda: scheduled_text(pipe, family, PROMPT, "blurry", 1, 20, 1),
        "sdkit, 2 chunks + editing + alternation": lambda: scheduled_text(pipe, family, long_prompt, "blurry",
                                                                          1, 20, 1),
    }
    best = dict.fromkeys(runs, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: contention between two threads is all noise
    with torch.inference_mode():
        for _ in range(7):
            for label, run in runs.items():
                started = time.perf_counter()
                run()
                best[label] = min(best[label], time.perf_counter() - started)
    torch.set_num_threads(threads)
    baseline = best["diffusers encode_prompt (baseline)"]
    print(f"\nprompt conditioning: toy-{model} on CPU, 20 steps (load average {os.getloadavg()[0]:.1f})")
    for label, seconds in best.items():
        print(f"  {label:<42} {seconds * 1000:7.1f} ms  ({seconds / baseline:.2f}x)")


# ---- GPU: full-size shapes ---------------------------------------------------------------

def build_random_folder(kind: str, root: Path, device: str) -> Path:
    """A diffusers folder of random fp16 weights with SD1.5 or SDXL base shapes."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from runtime_models import write_tokenizer
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    folder = root / kind
    if (folder / "model_index.json").is_file():
        return folder
    write_tokenizer(root / "tokenizer-files")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer-files", model_max_length=77)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    torch.manual_seed(0)
    with torch.device(device):
        if kind == "sdxl":
            pipe = StableDiffusionXLPipeline(
                vae=AutoencoderKL(**VAE, scaling_factor=0.13025, sample_size=1024),
                text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G, **ids)),
                tokenizer=tokenizer, tokenizer_2=tokenizer, unet=UNet2DConditionModel(**SDXL_UNET),
                scheduler=scheduler)
        else:
            pipe = StableDiffusionPipeline(
                vae=AutoencoderKL(**VAE, sample_size=512), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)),
                tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET), scheduler=scheduler, safety_checker=None,
                feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder)
    return folder


def gpu_comparison(kinds: list[str], device: str, steps: int, root: Path) -> None:
    sizes = {"sd15": 512, "sdxl": 1024}
    dtype = torch.float16 if device == "cuda" else torch.float32  # what sdkit's dtype "auto" picks
    where = torch.cuda.get_device_name() if device == "cuda" else device
    for kind in kinds:
        folder = build_random_folder(kind, root, device)
        ours = sdkit_run(folder, device, sizes[kind], steps, 7.0)
        if device == "cuda":
            torch.cuda.empty_cache()
        theirs = diffusers_run(folder, device, sizes[kind], steps, 7.0, dtype)
        report(f"{kind}-shaped random weights, {sizes[kind]}x{sizes[kind]}, {steps} steps, Euler a, "
               f"{str(dtype).removeprefix('torch.')} on {where}", ours, theirs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_full_size_iterations_per_second_gpu(bench_cache: Path) -> None:
    gpu_comparison(["sd15", "sdxl"], "cuda", 20, bench_cache / "sample")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "sdkit-bench" / "sample"))
    options = parser.parse_args()
    gpu_comparison(options.models.split(","), options.device, options.steps, Path(options.cache))
