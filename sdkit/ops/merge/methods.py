"""The built-in merge methods. Each sees one key at a time, as float32 tensors of equal
shape, and returns one float32 tensor; none modifies its inputs.

Inputs are named by position: A is the first model, B the second, and so on. Methods
that add task vectors (add_difference, train_difference, ties, dare) take A as the base.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch import Tensor

from sdkit.ops.merge import streamed
from sdkit.ops.merge.registry import merge_method
from sdkit.ops.merge.streamed import disjoint_mean, key_seed, plain_sum, slerp_weights, slice_dot

__all__ = ["key_seed"]  # with the methods, which register themselves


@merge_method(elementwise=True)
def weighted_sum(a: Tensor, b: Tensor, *, alpha: float = 0.5) -> Tensor:
    """(1 − alpha)·A + alpha·B; alpha 0 gives A and 1 gives B exactly."""
    return torch.lerp(a, b, alpha)


@merge_method(elementwise=True)
def add_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float = 1.0) -> Tensor:
    """A + alpha·(B − C): add what separates B from C onto A."""
    return a + alpha * (b - c)


@merge_method(elementwise=True)
def train_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float = 1.0) -> Tensor:
    """A + 1.8·alpha·(B − C)·|B − A| / (|B − C| + |B − A|) (supermerger's trainDifference).

    Where both distances are zero the added term is zero (B = C there).
    """
    diff = b - c
    to_a = (b - a).abs()
    total = diff.abs() + to_a
    share = torch.where(total > 0, to_a / torch.where(total > 0, total, 1.0), 0.0)
    return a + (1.8 * alpha) * diff * share


@merge_method(elementwise=True)
def n_average(*models: Tensor) -> Tensor:
    """The mean of all models, summed in input order."""
    total = models[0].clone()
    for model in models[1:]:
        total += model
    return total / len(models)


def _check_source(params: dict[str, Any]) -> str | None:
    source = str(params["source"]).strip().upper()
    if len(source) != 1 or not "A" <= source <= "Z":
        return f"source must name an input (A, B, ...), got {params['source']!r}"
    return None


@merge_method(name="copy", elementwise=True, check=_check_source, copies_input="source")
def copy_from(*models: Tensor, source: str = "A") -> Tensor:
    """Every tensor from the input named by `source` (combine with --take to assemble a
    model from components of several inputs)."""
    return models[ord(source.strip().upper()) - ord("A")]


def _check_density(params: dict[str, Any]) -> str | None:
    if not 0.0 < params["k"] <= 1.0:
        return f"k must be in (0, 1], got {params['k']}"
    return None


@merge_method(check=_check_density, streamed=streamed.ties)
def ties(base: Tensor, *models: Tensor, alpha: float = 1.0, k: float = 0.2) -> Tensor:
    """TIES-merging (arXiv 2306.01708) of the task vectors M − A onto A.

    Each task vector keeps its top-k fraction of entries by magnitude; the sign of each
    entry is elected from the sum of the trimmed vectors; the entries that agree with it
    are averaged (disjoint mean) and alpha times that mean is added to A.

    This is the whole-tensor form (the reference the streamed form in `streamed` is
    tested against); the engine merges files with the streamed form.
    """
    flat_base = base.reshape(-1)
    flat_models = [model.reshape(-1) for model in models]
    thresholds = [_top_fraction_threshold(model, flat_base, k) for model in flat_models]
    out = torch.empty_like(flat_base)
    for start in range(0, flat_base.numel(), streamed.REDUCE_SLICE):
        stop = start + streamed.REDUCE_SLICE
        part = flat_base[start:stop]
        deltas = []
        for model, threshold in zip(flat_models, thresholds):
            delta = model[start:stop] - part
            if threshold is not None:
                delta = torch.where(delta.abs() >= threshold, delta, 0.0)
            deltas.append(delta)
        out[start:stop] = part + alpha * disjoint_mean(deltas)
    return out.reshape(base.shape)


def _top_fraction_threshold(model: Tensor, base: Tensor, fraction: float) -> float | None:
    """The magnitude of the ceil(fraction·n)-th largest entry of |model − base| (keeping
    every entry at least that large keeps the top fraction, ties included), or None when
    everything is kept.

    An exact radix select instead of a sort or `kthvalue` over the whole tensor: a
    non-negative float32 orders like its bit pattern, so one pass counts the entries per
    top-16-bit bucket, which names the bucket holding the answer, and a second pass
    selects within the few entries of that bucket.
    """
    count = base.numel()
    keep = math.ceil(fraction * count)
    if count == 0 or keep >= count:
        return None
    buckets = torch.zeros(1 << 15, dtype=torch.int64)
    for bits in _magnitude_bits(model, base):
        buckets += torch.bincount(bits >> 16, minlength=1 << 15)
    at_or_above = buckets.flip(0).cumsum(0).flip(0)  # entries in this bucket or a higher one
    bucket = int((at_or_above >= keep).nonzero().max())
    above = int(at_or_above[bucket + 1]) if bucket + 1 < len(at_or_above) else 0
    inside = torch.cat([bits[(bits >> 16) == bucket] for bits in _magnitude_bits(model, base)])
    rank = keep - above  # the answer is the rank-th largest entry inside the bucket
    answer = inside.kthvalue(inside.numel() - rank + 1).values
    return float(answer.view(torch.float32))


def _magnitude_bits(model: Tensor, base: Tensor) -> Iterator[Tensor]:
    """|model − base| slice by slice, as the int32 bit patterns of the float32 values."""
    for start in range(0, base.numel(), streamed.REDUCE_SLICE):
        stop = start + streamed.REDUCE_SLICE
        yield (model[start:stop] - base[start:stop]).abs_().view(torch.int32)


def _check_drop(params: dict[str, Any]) -> str | None:
    if not 0.0 <= params["p"] < 1.0:
        return f"p (drop probability) must be in [0, 1), got {params['p']}"
    return None


@merge_method(check=_check_drop, streamed=streamed.dare)
def dare(base: Tensor, *models: Tensor, alpha: float = 1.0, p: float = 0.9, seed: int = 0,
         ties: bool = False, key: str = "") -> Tensor:
    """DARE (arXiv 2311.03099): drop each entry of the task vectors M − A with
    probability p, rescale the kept ones by 1/(1 − p), and add alpha times their sum to A
    (with ties=true, their TIES disjoint mean instead).

    The random mask of input i for a key is drawn from a generator seeded by
    sha256(seed, i, key), so it does not depend on key order or threads (the streamed
    form draws the same stream slice after slice: the same masks).
    """
    rescaled = []
    for index, model in enumerate(models, start=1):
        generator = torch.Generator().manual_seed(key_seed(seed, index, key))
        kept = torch.rand(base.shape, generator=generator) >= p
        rescaled.append(torch.where(kept, (model - base) / (1.0 - p), 0.0))
    combined = disjoint_mean(rescaled) if ties else plain_sum(rescaled)
    return base + alpha * combined


@merge_method(streamed=streamed.slerp)
def slerp(a: Tensor, b: Tensor, *, alpha: float = 0.5) -> Tensor:
    """Spherical interpolation of the directions of A and B, scaled to the interpolated
    norm (1 − alpha)·|A| + alpha·|B|. Falls back to weighted sum where the angle is
    undefined or degenerate: a zero tensor, parallel or anti-parallel A and B.

    |A|, |B| and A·B are float64 sums over fixed slices of REDUCE_SLICE elements, the
    slices the streamed form reads, so both give the same numbers.
    """
    weights = slerp_weights(math.sqrt(_dot(a, a)), math.sqrt(_dot(b, b)), _dot(a, b), alpha)
    return torch.lerp(a, b, alpha) if weights is None else a * weights[0] + b * weights[1]


def _dot(a: Tensor, b: Tensor) -> float:
    """sum(a·b) accumulated in float64 over fixed slices, in order."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for start in range(0, flat_a.numel(), streamed.REDUCE_SLICE):
        stop = start + streamed.REDUCE_SLICE
        total += slice_dot(flat_a[start:stop], flat_b[start:stop])
    return total
