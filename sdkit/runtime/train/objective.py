"""The denoising objective: noise schedule, noisy latents, target, loss weighting.

The noise schedule is DDPM's, built from the base's scheduler config (SD's betas
0.00085 -> 0.012 scaled_linear over 1000 steps unless the model says otherwise); the
target is the noise for epsilon models and the velocity for v-prediction ones, following
the config's `prediction_type` unless overridden. Options as in diffusers' trainers
(research: train.md §1): noise offset `noise += offset * randn(B, C, 1, 1)`; min-SNR-γ
weights min(snr, γ)/snr (epsilon) or min(snr, γ)/(snr + 1) (v-prediction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from sdkit.errors import SdkitError
from sdkit.runtime.train.config import LossOptions


@dataclass
class NoisyBatch:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


class Objective:
    def __init__(self, scheduler_config: Mapping[str, Any], options: LossOptions) -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config({**scheduler_config, "clip_sample": False})
        self.prediction = options.prediction_type or self.scheduler.config.prediction_type
        if self.prediction not in ("epsilon", "v_prediction"):
            raise SdkitError(f"the base's scheduler predicts {self.prediction!r}; training supports "
                             "epsilon and v_prediction (set --prediction-type)")
        self.options = options
        self.timesteps = int(self.scheduler.config.num_train_timesteps)

    def noisy_batch(self, latents: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        """Noise and timesteps drawn on the CPU from `generator` (same numbers on any device)."""
        batch, channels = latents.shape[:2]
        noise = torch.randn(latents.shape, generator=generator)
        if self.options.noise_offset:
            noise += self.options.noise_offset * torch.randn((batch, channels, 1, 1), generator=generator)
        timesteps = torch.randint(0, self.timesteps, (batch,), generator=generator)
        noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        return NoisyBatch(noisy, timesteps, target)

    def loss(self, prediction: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        """Per-sample loss (B,), min-SNR weighted when asked."""
        per_sample = F.mse_loss(prediction.float(), batch.target.float(), reduction="none")
        per_sample = per_sample.mean(dim=list(range(1, per_sample.dim())))
        gamma = self.options.min_snr_gamma
        if gamma is None:
            return per_sample
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, batch.timesteps).float()
        clipped = torch.clamp(snr, max=gamma)
        weights = clipped / (snr + 1) if self.prediction == "v_prediction" else clipped / snr
        return per_sample * weights
