"""Training on FLUX.1: the rectified-flow objective and the transformer as one module.

The objective is the one diffusers' `train_dreambooth_lora_flux.py` and kohya's
`flux_train_network.py` (`library/flux_train_utils.py`) train with: latents x (the VAE's
mean, `(x - shift_factor) * scaling_factor`), noise n, a noise level sigma in [0, 1],
`noisy = (1 - sigma) x + sigma n`, the transformer asked for `n - x` with sigma as its
timestep (diffusers passes `timesteps / 1000`, which is sigma), a plain mean squared
error. Noise levels (`--timestep-sampling`):

- `uniform` (default; both scripts' default): an index drawn uniformly into the base
  scheduler's 1000-entry sigma table, so a schedule with a fixed shift (dev's shift 3 when
  not dynamic) is sampled shifted, schnell's (shift 1) uniformly;
- `logit-normal`: the index from sigmoid(N(0, 1)) instead (diffusers' `logit_normal` with
  mean 0 and std 1: more weight on middle noise levels); both drawn by diffusers'
  `compute_density_for_timestep_sampling`, as the script draws them;
- `shift`: kohya's `--timestep_sampling shift`: s = sigmoid(N(0, 1)), sigma =
  s·k / (1 + (k - 1)·s) with k = `--flow-shift` (kohya's `--discrete_flow_shift`, 3.0).

`FluxDenoiser` holds the transformer (the text encoders are frozen and run without
gradients): captions are encoded as `FluxPipeline.encode_prompt` encodes them (CLIP's
pooled vector, T5's hidden states at the tokenizer's context length, at most 512), once
per distinct caption, the
latents packed into 2x2 tokens with their position ids, and a dev base (guidance
embedder) is given the guidance both scripts train with by default, 3.5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdkit.runtime.train.config import LossOptions
from sdkit.runtime.train.objective import NoisyBatch

TRAIN_GUIDANCE = 3.5  # `--guidance_scale` default of both scripts (dev bases only)
MAX_T5_TOKENS = 512


def flow_metadata(sampling: str, shift: float) -> dict[str, str]:
    """kohya's FLUX.1 training keys for how noise levels were drawn."""
    kohya_sampling = {"uniform": "sigma", "logit-normal": "sigma", "shift": "shift"}[sampling]
    return {"ss_timestep_sampling": kohya_sampling, "ss_weighting_scheme":
            "logit_normal" if sampling == "logit-normal" else "uniform",
            "ss_logit_mean": "0.0", "ss_logit_std": "1.0", "ss_sigmoid_scale": "1.0",
            "ss_discrete_flow_shift": str(shift), "ss_model_prediction_type": "raw",
            "ss_guidance_scale": str(TRAIN_GUIDANCE), "ss_apply_t5_attn_mask": "False"}


def design_architecture(family: str, transformer: nn.Module) -> str | None:
    """ModelSpec architecture of the released design the transformer follows: dev (a
    guidance embedder) or schnell (none), told by the family's releases' flags."""
    from sdkit.arch.families import FAMILIES

    guidance = bool(transformer.config.guidance_embeds)
    for release in FAMILIES[family].releases:
        if release.flags.get("guidance") == guidance and release.variant == "normal":
            return release.modelspec_architecture
    return None


class FlowObjective:
    def __init__(self, scheduler_config: Mapping[str, Any], options: LossOptions) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
        self.sigma_table = scheduler.sigmas.float()[:int(scheduler.config.num_train_timesteps)]
        self.sampling = options.timestep_sampling or "uniform"
        self.shift = options.shift

    def sigmas(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        if self.sampling == "shift":
            drawn = torch.sigmoid(torch.randn((batch,), generator=generator))
            return drawn * self.shift / (1 + (self.shift - 1) * drawn)
        from diffusers.training_utils import compute_density_for_timestep_sampling

        scheme = "logit_normal" if self.sampling == "logit-normal" else "none"
        u = compute_density_for_timestep_sampling(scheme, batch, logit_mean=0.0, logit_std=1.0, generator=generator)
        indices = (u * len(self.sigma_table)).long().clamp_(max=len(self.sigma_table) - 1)
        return self.sigma_table[indices]

    def noisy_batch(self, latents: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        """Noise and noise levels drawn on the CPU from `generator`; `timesteps` holds sigma."""
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        sigmas = self.sigmas(latents.shape[0], generator).to(latents.device, latents.dtype)
        level = sigmas.view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1 - level) * latents + level * noise
        return NoisyBatch(noisy, sigmas, noise - latents)

    def loss(self, prediction: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        per_sample = F.mse_loss(prediction.float(), batch.target.float(), reduction="none")
        return per_sample.mean(dim=list(range(1, per_sample.dim())))


class FluxDenoiser(nn.Module):
    """FLUX.1's transformer with its frozen text encoders: captions in, velocity out."""

    sdxl = False

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        self.transformer = pipe.transformer
        self.encoders = nn.ModuleList([pipe.text_encoder, pipe.text_encoder_2])
        self._pipe = pipe
        self.text_length = min(MAX_T5_TOKENS, int(pipe.tokenizer_2.model_max_length))
        self._encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_ids = torch.zeros(0)

    def tokenize(self, captions: Sequence[str]) -> list[str]:
        """Captions go to the pipeline's own prompt encoder as they are."""
        return list(captions)

    def encode(self, captions: Sequence[str], device: torch.device) -> tuple[torch.Tensor, ...]:
        """(T5 states, CLIP pooled vectors, text position ids) of the captions. The encoders are
        frozen, so each distinct caption is encoded once and kept on the CPU (as diffusers'
        script precomputes its instance prompt and kohya caches text-encoder outputs)."""
        missing = sorted({caption for caption in captions if caption not in self._encoded})
        if missing:
            with torch.no_grad():
                embeds, pooled, text_ids = self._pipe.encode_prompt(
                    prompt=missing, prompt_2=None, device=device, max_sequence_length=self.text_length)
            for index, caption in enumerate(missing):
                self._encoded[caption] = (embeds[index].cpu(), pooled[index].cpu())
            self._text_ids = text_ids.cpu()
        embeds = torch.stack([self._encoded[caption][0] for caption in captions]).to(device)
        pooled = torch.stack([self._encoded[caption][1] for caption in captions]).to(device)
        return embeds, pooled, self._text_ids.to(device)

    def forward(self, noisy: torch.Tensor, sigmas: torch.Tensor, captions: Sequence[str],
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        dtype = self.transformer.dtype
        embeds, pooled, text_ids = self.encode(captions, noisy.device)
        packed = FluxPipeline._pack_latents(noisy.to(dtype), batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), TRAIN_GUIDANCE, device=noisy.device, dtype=torch.float32)
        prediction = self.transformer(hidden_states=packed, timestep=sigmas.to(dtype), guidance=guidance,
                                      pooled_projections=pooled.to(dtype), encoder_hidden_states=embeds.to(dtype),
                                      txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        # latent sides given as pixel sides with a scale factor of 1
        return FluxPipeline._unpack_latents(prediction, height, width, 1)
