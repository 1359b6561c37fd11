"""The latent-space measurement of `vae_check` for rectified-flow transformers (FLUX.1).

The base transformer sees a candidate's latents as it saw them in training: normalised
`(encoded - shift) * scale`, mixed with noise as `x = (1 - sigma) * latent + sigma * noise`,
and asked for the velocity `noise - latent`, with the empty prompt's context (what
classifier-free guidance and caption dropout train it on). Its error is divided by that of
an oracle that knows only each latent channel's mean and variance: the best linear
estimate of the velocity from x leaves

    1 + s^2 - (sigma - (1 - sigma) s^2)^2 / ((1 - sigma)^2 s^2 + sigma^2)

per element for a channel of variance s^2. A transformer denoises the latent space it
learnt at least as well as that oracle; latents of another space (the same VAE design
trained elsewhere, channels in another order) are foreign to it. The score and ratio mean
what they mean for UNets (`vae_check`), so the same thresholds decide.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdkit.errors import SdkitError

SIGMAS = (0.2, 0.4, 0.6, 0.8)


@dataclass
class FlowDenoiser:
    """What the numeric tests need from a FLUX.1 base: its pipeline (transformer, text
    encoders) and the latent normalisation it was trained with."""

    pipe: Any
    scaling_factor: float
    shift_factor: float
    scaling_source: str
    vae: Any | None  # the base's own AutoencoderKL, when it carries one
    context: dict[str, torch.Tensor] | None = None  # the empty prompt, set by `condition`

    def normalise(self, encoded: torch.Tensor) -> torch.Tensor:
        return (encoded - self.shift_factor) * self.scaling_factor

    def probe_size(self, candidate: Any, cap: int) -> int:
        """The VAE's own training size in pixels, capped; a multiple of what the VAE and
        FLUX's 2x2 packing downsample by."""
        vae_factor = 2 ** (len(candidate.config.block_out_channels) - 1)
        step = vae_factor * 2
        wanted = min(int((self.vae or candidate).config.sample_size), cap)
        return max(step, wanted // step * step)

    def condition(self, size: int) -> None:
        """The empty prompt through both text encoders, at the context length the T5
        tokenizer says (512 for the released one, what FluxPipeline pads to)."""
        length = min(512, int(self.pipe.tokenizer_2.model_max_length))
        embeds, pooled, text_ids = self.pipe.encode_prompt(prompt=[""], prompt_2=None, device=torch.device("cpu"),
                                                           max_sequence_length=length)
        self.context = {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}


def load_flow_base(path: Path, config: Path | None, text_encoders: Sequence[str | Path],
                   candidate: Path, has_vae: bool) -> FlowDenoiser:
    """The base's pipeline as `sdkit sample` loads it. A lone diffusion model is given its
    text encoders as files and, for loading only, the candidate as its VAE: the base then
    has no VAE of its own to compare with."""
    from sdkit.runtime.pipeline import load_model, read_config_folder

    loaded = load_model(path, config=config, device="cpu", dtype="fp32", flow=True,
                        vae=None if has_vae else candidate, text_encoders=text_encoders)
    pipe = loaded.pipe
    if has_vae:
        settings, source = dict(pipe.vae.config), "the base's VAE config"
    else:
        settings = (read_config_folder(config).get("vae") or {}) if config is not None else {}
        source = "--config's VAE config"
    if "scaling_factor" not in settings:
        raise SdkitError(f"{path}: the latent scale the base was trained with is unknown; pass --config DIR "
                         "(a diffusers folder of this model, with vae/config.json)")
    return FlowDenoiser(pipe, float(settings["scaling_factor"]), float(settings.get("shift_factor") or 0.0),
                        source, pipe.vae if has_vae else None)


def _oracle_errors(latents: torch.Tensor, sigmas: Sequence[float]) -> list[float]:
    variance = latents.var(dim=(0, 2, 3))
    return [float((1 + variance - (s - (1 - s) * variance) ** 2 / ((1 - s) ** 2 * variance + s ** 2)).mean())
            for s in sigmas]


def _velocity_errors(denoiser: FlowDenoiser, sets: list[torch.Tensor], sigmas: Sequence[float]) -> list[list[float]]:
    """Velocity MSE of the transformer on each set of normalised latents at each sigma;
    every set gets the same noise, and all sets run in one batch."""
    from diffusers import FluxPipeline

    assert denoiser.context is not None  # set by `condition`
    latents = torch.cat(sets)
    batch, channels, height, width = latents.shape
    pixels = height * denoiser.pipe.vae_scale_factor, width * denoiser.pipe.vae_scale_factor
    context = {k: v.expand(batch, *v.shape[1:]) if v.dim() > 2 else v for k, v in denoiser.context.items()}
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
    transformer = denoiser.pipe.transformer
    guidance = torch.full((batch,), 1.0) if transformer.config.guidance_embeds else None
    errors: list[list[float]] = [[] for _ in sets]
    for index, sigma in enumerate(sigmas):
        noise = torch.randn(sets[0].shape, generator=torch.Generator().manual_seed(1000 + index))
        noise = noise.repeat(len(sets), 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * noise
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        output = transformer(hidden_states=packed, timestep=torch.full((batch,), sigma), guidance=guidance,
                             img_ids=image_ids, return_dict=False, **context)[0]
        velocity = FluxPipeline._unpack_latents(output, *pixels, denoiser.pipe.vae_scale_factor)
        for number, part in enumerate(((velocity - (noise - latents)) ** 2).chunk(len(sets))):
            errors[number].append(float(part.mean()))
    return errors


def flow_denoising(denoiser: FlowDenoiser, candidate: torch.Tensor, base: torch.Tensor | None,
                   sigmas: Sequence[float] = SIGMAS) -> dict[str, Any]:
    """Scores as `vae_check._denoising` reports them, for the posterior means given."""
    named = {"candidate": denoiser.normalise(candidate)}
    if base is not None:
        named["base"] = denoiser.normalise(base)
    errors = _velocity_errors(denoiser, list(named.values()), sigmas)
    return denoising_scores(("sigmas", list(sigmas)), named, errors, lambda latents: _oracle_errors(latents, sigmas))


def denoising_scores(points: tuple[str, list[Any]], named: dict[str, torch.Tensor], errors: list[list[float]],
                     oracle: Callable[[torch.Tensor], list[float]]) -> dict[str, Any]:
    """The report of a denoising test: for each named set of latents its errors at each
    point (timestep or sigma), the oracle's, their `score` (sum over sum), and the
    candidate's score over the base's (`ratio`) where the base's own latents were run."""
    result: dict[str, Any] = {points[0]: points[1]}
    for (name, latents), found in zip(named.items(), errors):
        best = oracle(latents)
        result[f"{name}_mse"] = [round(e, 5) for e in found]
        result[f"{name}_oracle_mse"] = [round(o, 5) for o in best]
        result[f"{name}_score"] = round(sum(found) / sum(best), 4)
    if "base" in named:
        result["ratio"] = round(result["candidate_score"] / result["base_score"], 4)
    return result
