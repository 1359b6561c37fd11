"""Latents of the training pictures: the VAE run once (in memory or on disk) or per load.

What is kept is the VAE's latent distribution (mean and log-variance), not a draw from
it: each step draws a fresh latent from the step's own generator, as diffusers' trainers
do, so a cached run and an uncached one train on the same kind of samples. The VAE always
runs in float32 (the SDXL VAE overflows in float16: "NaN detected in latents", research
train.md §8); non-finite latents are refused naming the picture.

A cache entry belongs to a (picture, bucket, crop): the samples `--repeats` makes of one
picture share it, so the VAE runs once per picture, not once per repeat. Random crops are
never cached: a cached latent would freeze one crop for the whole run, which is why
kohya's sd-scripts refuses `--cache_latents` with `--random_crop`, and `check_config`
refuses `--crop random` unless `--cache-latents off` (each load then encodes its own crop).

The disk cache is one small safetensors file per entry, named by a hash of the picture
file (name, size, modification time), its bucket and crop, and the VAE's weights, so a
changed picture, crop or VAE is never served stale.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from sdkit.errors import SdkitError
from sdkit.runtime.train.buckets import Crop, Size, load_pixels, plan_crop
from sdkit.runtime.train.data import ImageRecord

Progress = Callable[[int, int], None]  # (pictures encoded, pictures in all)
CacheKey = tuple[Path, Size, Crop, bool]  # (picture, bucket, crop, mirrored)


@dataclass(frozen=True)
class TrainSample:
    """One picture as trained: its bucket and caption; class pictures for prior preservation."""

    record: ImageRecord
    bucket: Size
    caption: str
    is_class: bool = False
    weight: float = 1.0  # the loss weight (kohya's prior-loss weight for regularization pictures)
    keep_tokens: int = 0  # with shuffle_caption: tags that stay first
    shuffle_caption: bool = False
    flip_aug: bool = False  # trained mirrored half the time


@dataclass
class LatentBatch:
    latents: torch.Tensor  # (B, C, h, w), scaled for the UNet
    crops: list[Crop]
    samples: list[TrainSample]


def vae_fingerprint(vae: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class LatentSource:
    """Latent distributions of `samples`, encoded by `vae` (mode "memory" | "disk" | "off")."""

    def __init__(self, vae: torch.nn.Module, samples: Sequence[TrainSample], mode: str, crop_mode: str,
                 cache_dir: Path | None = None) -> None:
        self.vae = vae
        self.samples = list(samples)
        self.mode = mode
        self.crop_mode = crop_mode
        self.cache_dir = cache_dir
        self.encoded = 0  # pictures the VAE has seen (for reports and tests)
        self._memory: dict[CacheKey, torch.Tensor] = {}
        self._fingerprint: str | None = None
        config = vae.config
        self.scaling = float(config.scaling_factor)
        self.shift = float(getattr(config, "shift_factor", None) or 0.0)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def prepare(self, progress: Progress | None = None) -> None:
        """Encode every (picture, bucket, crop) once (nothing to do when not caching)."""
        if self.mode == "off":
            return
        if self.mode == "disk":
            if self.cache_dir is None:
                raise ValueError("a disk cache needs a folder")
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._fingerprint = vae_fingerprint(self.vae)
        entries = {key: sample for sample in self.samples for key in _cache_keys(sample)}  # repeats share one
        for done, (key, sample) in enumerate(entries.items(), start=1):
            self._memory[key] = self._cached(sample, key[2], key[3])
            if progress is not None:
                progress(done, len(entries))

    def _cached(self, sample: TrainSample, crop: Crop, mirrored: bool) -> torch.Tensor:
        if self.mode == "memory":
            return self._encode(sample, crop, mirrored)
        path = self._cache_path(sample, crop, mirrored)
        if path.is_file():
            from safetensors.torch import load_file

            return load_file(path)["distribution"]
        distribution = self._encode(sample, crop, mirrored)
        _save_atomic(path, distribution)
        return distribution

    def _cache_path(self, sample: TrainSample, crop: Crop, mirrored: bool) -> Path:
        stat = sample.record.path.stat()
        parts = (sample.record.path.resolve(), stat.st_size, stat.st_mtime_ns, sample.bucket, crop, self._fingerprint,
                 *(("mirrored",) if mirrored else ()))
        key = "|".join(str(part) for part in parts)
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.cache_dir / f"{sample.record.path.stem}-{name}.safetensors"  # type: ignore[operator]

    @torch.no_grad()
    def _encode(self, sample: TrainSample, crop: Crop, mirrored: bool = False) -> torch.Tensor:
        pixels = load_pixels(sample.record.path, sample.bucket, crop, mirrored).unsqueeze(0)
        parameters = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist.parameters
        self.encoded += 1
        if not torch.isfinite(parameters).all():
            raise SdkitError(f"{sample.record.path}: the VAE gave non-finite latents for this picture")
        return parameters[0].float().cpu()

    def batch(self, indices: Sequence[int], generator: torch.Generator, rng: random.Random) -> LatentBatch:
        """Latents drawn for the samples at `indices` (all of one bucket)."""
        distributions, crops = [], []
        for index in indices:
            sample = self.samples[index]
            mirrored = sample.flip_aug and rng.random() < 0.5  # kohya's flip_aug: half the loads mirrored
            if self.mode == "off":
                crop = plan_crop(sample.record.width, sample.record.height, sample.bucket, self.crop_mode, rng)
                distributions.append(self._encode(sample, crop, mirrored))
            else:
                key = _cache_keys(sample)[int(mirrored)]
                crop = key[2]
                distributions.append(self._memory[key])
            crops.append(crop)
        stacked = torch.stack(distributions)
        mean, logvar = stacked.chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator)
        latents = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        scaled = (latents - self.shift) * self.scaling
        return LatentBatch(scaled, crops, [self.samples[i] for i in indices])


def _cache_keys(sample: TrainSample) -> list[CacheKey]:
    """A cached sample's entries: cached latents are always of the center crop; a sample
    with flip_aug has its mirrored picture's latents too (as kohya caches them)."""
    record = sample.record
    crop = plan_crop(record.width, record.height, sample.bucket, "center")
    return [(record.path, sample.bucket, crop, mirrored) for mirrored in (False, True)[:1 + sample.flip_aug]]


def _save_atomic(path: Path, distribution: torch.Tensor) -> None:
    from safetensors.torch import save_file

    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        save_file({"distribution": distribution.contiguous()}, str(partial))
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise SdkitError(f"{path}: cannot write the latent cache: {exc.strerror or exc}") from None
