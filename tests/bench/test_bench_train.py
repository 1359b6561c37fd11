"""Training benchmark (make bench): optimizer steps per second of every method on the toy
SD1 model on CPU, against a bare peft LoRA loop (noise, UNet forward and backward, AdamW)
on the same model measured in the same run, as a ratio.

The bare loop is the floor of what any trainer can do per step; the ratio says what
sdkit's loop adds (tokenizing, bucketed batches, latent draws, accelerate, bookkeeping).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "sd1"
STEPS = 40
METHODS = ("lora", "loha", "lokr", "ti", "hypernet", "dreambooth")

pytestmark = pytest.mark.skipif(not (TOY / "diffusers" / "model_index.json").is_file(),
                                reason="toy models not built (make fixtures)")


def _pictures(folder: Path) -> Path:
    from sdkit.runtime.toyscore import LIGHT_BACKGROUNDS, random_scene, render_scene

    folder.mkdir()
    rng = random.Random(0)
    for index in range(8):
        render_scene(random_scene(rng, LIGHT_BACKGROUNDS)).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text("a photo of sks")
    return folder


def _bare_lora_steps_per_second(steps: int) -> float:
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(TOY / "diffusers", subfolder="unet").requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    schedule = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    latents = torch.randn(1, 4, unet.config.sample_size, unet.config.sample_size)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)

    def step() -> None:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (1,))
        prediction = unet(schedule.add_noise(latents, noise, timesteps), timesteps, context).sample
        F.mse_loss(prediction, noise).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    step()  # the first backward carries one-time warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - started)


def test_bench_training_steps_per_second(tmp_path):
    from sdkit.runtime.train import (DataOptions, DreamBoothOptions, OptimOptions, RunOptions, TrainConfig,
                                     train)

    torch.set_num_threads(1)  # toy tensors: one thread beats two contended ones several times over
    data = _pictures(tmp_path / "data")
    baseline = _bare_lora_steps_per_second(STEPS)
    print(f"\ntraining on CPU, toy SD1 32x32, batch 1, {STEPS} steps "
          f"(bare peft LoRA loop: {baseline:.1f} steps/s)")
    print(f"{'method':<11} {'steps/s':>8} {'x bare':>7} {'total s':>8}")
    for method in METHODS:
        output = tmp_path / f"{method}{'.pt' if method == 'hypernet' else '.safetensors'}"
        config = TrainConfig(method, TOY / "toy-sd1.safetensors", output, DataOptions(data, resolution=32),
                             config_dir=TOY / "diffusers", optim=OptimOptions(steps=STEPS),
                             dreambooth=DreamBoothOptions(), run=RunOptions())
        started = time.perf_counter()
        result = train(config)
        rate = result.timings["steps_per_second"]
        print(f"{method:<11} {rate:>8.1f} {rate / baseline:>7.2f} {time.perf_counter() - started:>8.1f}")
        assert result.steps == STEPS
