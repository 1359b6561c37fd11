"""Aspect-ratio buckets, crops, and the order pictures are trained in.

Buckets follow kohya's `make_bucket_resolutions` (research: train.md §2): every
(width, height) whose sides are multiples of the bucket step, lie between half and twice
the training resolution, and whose area is at most resolution²  — the largest height for
each width — plus the square. An image goes to the bucket nearest its aspect ratio
(compared as log ratios, so 2:1 and 1:2 are equally far from 1:1), is resized to cover it
and cropped (center, or at a random place each time it is loaded).

The step is the VAE's downscaling factor times the UNet's (2^(levels-1)), so every latent
side divides evenly through the UNet: 64 for SD.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from sdkit.errors import SdkitError

Size = tuple[int, int]  # (width, height)


def bucket_step(vae_factor: int, unet_levels: int) -> int:
    return vae_factor * 2 ** (unet_levels - 1)


def bucket_resolutions(resolution: int, step: int) -> list[Size]:
    """kohya-style buckets for a square training `resolution`, sides multiples of `step`."""
    if resolution < step:
        raise SdkitError(f"--resolution {resolution} is below the bucket step {step}")
    area = resolution * resolution
    low = max(step, (resolution // 2) // step * step)
    high = resolution * 2 // step * step
    square = int(math.sqrt(area)) // step * step
    found = {(square, square)}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            found.update({(width, height), (height, width)})
    return sorted(found)


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


@dataclass(frozen=True)
class Crop:
    """How a picture becomes a bucket-sized one: resized to `scaled`, then cut at left/top."""

    scaled: Size
    left: int
    top: int


def plan_crop(width: int, height: int, bucket: Size, mode: str, rng: random.Random | None = None) -> Crop:
    scale = max(bucket[0] / width, bucket[1] / height)
    scaled = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    spare_x, spare_y = scaled[0] - bucket[0], scaled[1] - bucket[1]
    if mode == "random":
        rng = rng or random.Random()
        return Crop(scaled, rng.randint(0, spare_x), rng.randint(0, spare_y))
    return Crop(scaled, spare_x // 2, spare_y // 2)


def load_pixels(path: object, bucket: Size, crop: Crop, mirrored: bool = False) -> torch.Tensor:
    """The cropped picture (mirrored left-right after the crop, as kohya's flip_aug) as a
    (3, H, W) float tensor in [-1, 1]."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as image:  # type: ignore[arg-type]
        rgb = image.convert("RGB").resize(crop.scaled, Image.Resampling.LANCZOS)
    box = (crop.left, crop.top, crop.left + bucket[0], crop.top + bucket[1])
    cropped = rgb.crop(box)
    array = np.asarray(ImageOps.mirror(cropped) if mirrored else cropped, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def epoch_batches(buckets: Sequence[Size], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of sample indices for one epoch: each batch from one bucket, samples and
    batches shuffled by (seed, epoch) so any epoch can be rebuilt on resume."""
    rng = random.Random(f"{seed}:{epoch}")
    by_bucket: dict[Size, list[int]] = {}
    for index, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).append(index)
    batches = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        rng.shuffle(members)
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


class BatchPlan:
    """The global sequence of batches over endless epochs: batch `index` of the run."""

    def __init__(self, buckets: Sequence[Size], batch_size: int, seed: int) -> None:
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.seed = seed
        self._epoch, self._batches = 0, epoch_batches(self.buckets, batch_size, seed, 0)
        self.per_epoch = len(self._batches)

    def batch_at(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.buckets, self.batch_size, self.seed, epoch)
        return self._batches[position]
