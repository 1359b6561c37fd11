"""Repairs: CLIP `position_ids` rows broken by merges, written again as the int64 ramp.

A merge that averages every tensor turns the int64 `position_ids` buffer into floats that
drift off the integers, and the text encoder then reads the wrong position embeddings
(arenasys toolkit `fix_clip`; ComfyUI rounds them on load). The fix writes
`arange(n)` as int64 in the original shape. Which rows are broken is told by
`sdkit.arch.hygiene.broken_position_ids`.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Mapping

from sdkit.io import LazyTensor

if TYPE_CHECKING:
    import torch


def _ramp(shape: tuple[int, ...]) -> "torch.Tensor":
    import torch

    count = 1
    for dim in shape:
        count *= dim
    return torch.arange(count, dtype=torch.int64).reshape(shape)


def fix_position_ids(tensors: Mapping[str, LazyTensor], broken: Mapping[str, str]) -> dict[str, LazyTensor]:
    """`tensors` with every broken row named in `broken` replaced by the int64 ramp."""
    fixed = dict(tensors)
    for name in broken:
        if name in fixed:
            shape = fixed[name].shape
            fixed[name] = LazyTensor("I64", shape, partial(_ramp, shape))
    return fixed
