"""Low-rank factorisation of weight deltas, shared by extract, resize and SVD merge.

`factorize(delta, rule)` returns LoRA factors `up` (out, r[, 1, 1]) and `down`
(r, in[, kh, kw]) with `up @ down ≈ delta`, the singular values folded into `up` as
sd-scripts does. The rank is fixed (capped by the matrix size) or chosen per layer by
sd-scripts' dynamic methods, capped at the requested rank:

- `sv_ratio` p: keep the singular values above σ_max / p;
- `sv_cumulative` p: the smallest rank whose Σσ reaches the fraction p of the total;
- `sv_fro` p: the smallest rank whose Σσ² reaches p² of the total (Frobenius norm p);
- a zero matrix gets rank 1.

The optional clamp bounds both factors to ±q-quantile of their joined values (sd-scripts'
extract and svd-merge use q = 0.99). `randomized` uses a randomized SVD (rank +
oversampling columns, a few power iterations: `randomized_svd`) instead of the full SVD; `sv_cumulative`
then sums only the singular values it computed. Every result carries the retained
energy Σσ²(kept) / ‖delta‖²_F.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdkit.errors import SdkitError

if TYPE_CHECKING:
    import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
_MIN_SINGULAR_VALUE = 1e-6  # sd-scripts: below this the delta counts as zero


@dataclass(frozen=True)
class RankRule:
    """How to pick each layer's rank and how to factor it."""

    rank: int  # the rank of linear / 1x1 layers (the cap with a dynamic method)
    conv_rank: int | None = None  # the rank of 3x3 convs (default: rank)
    dynamic: str | None = None  # one of DYNAMIC_METHODS
    value: float | None = None  # the dynamic method's parameter
    clamp_quantile: float | None = None
    randomized: bool = False
    oversample: int = 8
    iterations: int = 2

    def check(self) -> None:
        if self.rank < 1 or (self.conv_rank is not None and self.conv_rank < 1):
            raise SdkitError("the rank must be at least 1")
        if self.dynamic is not None:
            if self.dynamic not in DYNAMIC_METHODS:
                raise SdkitError(f"dynamic method must be one of {', '.join(DYNAMIC_METHODS)}")
            if self.value is None or self.value <= 0:
                raise SdkitError(f"{self.dynamic} needs a positive value")
        if self.clamp_quantile is not None and not 0 < self.clamp_quantile <= 1:
            raise SdkitError("the clamp quantile must be in (0, 1]")

    def cap_for(self, shape: tuple[int, ...]) -> int:
        spatial = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        return (self.conv_rank or self.rank) if spatial else self.rank


@dataclass
class Factors:
    up: "torch.Tensor"
    down: "torch.Tensor"
    rank: int
    retained: float  # Σσ² kept / ‖delta‖²_F (1.0 for a zero delta)


def choose_rank(singular: "torch.Tensor", cap: int, method: str | None, value: float | None,
                total_square: float | None = None) -> int:
    """sd-scripts' `rank_resize`: the dynamic rank (or `cap`), at most `cap`, 1 for zero."""
    import torch

    count = len(singular)
    if method == "sv_ratio":
        index = int((singular > singular[0] / value).sum()) - 1
    elif method == "sv_cumulative":
        cumulative = torch.cumsum(singular, 0) / singular.sum()
        index = int(torch.searchsorted(cumulative, torch.tensor(value, dtype=cumulative.dtype)))
    elif method == "sv_fro":
        squares = singular.pow(2)
        total = total_square if total_square is not None else float(squares.sum())
        cumulative = torch.cumsum(squares, 0) / total
        index = int(torch.searchsorted(cumulative, torch.tensor(value ** 2, dtype=cumulative.dtype)))
    else:
        return 1 if count == 0 or float(singular[0]) <= _MIN_SINGULAR_VALUE else min(cap, count)
    rank = max(0, min(index, count - 1)) + 1
    if float(singular[0]) <= _MIN_SINGULAR_VALUE:
        return 1
    return min(rank, cap)


def quantile(values: "torch.Tensor", q: float) -> float:
    """`torch.quantile(values, q)` (linear interpolation) without its size limit."""
    ordered = values.flatten().sort().values
    position = q * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def decompose(matrix: "torch.Tensor", rule: RankRule, cap: int
              ) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(U, S, Vh) of a 2-D matrix: full, or the randomized leading part."""
    import torch

    if rule.randomized:
        return randomized_svd(matrix, min(cap + rule.oversample, *matrix.shape), rule.iterations)
    return torch.linalg.svd(matrix, full_matrices=False)


def randomized_svd(matrix: "torch.Tensor", columns: int, iterations: int
                   ) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(U, S, Vh) of the leading `columns` singular triplets, by Halko, Martinsson and
    Tropp's range finder with `iterations` power iterations: the steps and the result of
    `torch.svd_lowrank` after `torch.manual_seed(0)`, but drawn from a generator of its
    own, so factorisations on concurrent threads cannot interleave their draws (the
    global generator made them differ from run to run)."""
    import torch

    transposed = matrix.shape[0] < matrix.shape[1]
    tall = matrix.mT if transposed else matrix
    sketch = torch.randn(tall.shape[1], columns, dtype=tall.dtype,
                         generator=torch.Generator().manual_seed(0))
    basis = torch.linalg.qr(tall @ sketch).Q
    for _ in range(iterations):
        basis = torch.linalg.qr(tall.mT @ basis).Q
        basis = torch.linalg.qr(tall @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mT @ tall, full_matrices=False)
    u = basis @ u
    return (vh.mT, s, u.mT) if transposed else (u, s, vh)


def factorize(delta: "torch.Tensor", rule: RankRule, cap: int | None = None) -> Factors:
    """LoRA factors of `delta` (out, in[, kh, kw]) under `rule` (`cap` overrides its rank)."""
    import torch

    cap = cap or rule.cap_for(tuple(delta.shape))
    matrix = delta.float().reshape(delta.shape[0], -1)
    cap = min(cap, *matrix.shape)
    u, s, vh = decompose(matrix, rule, cap)
    total = float(matrix.pow(2).sum())
    exact_total = None if not rule.randomized else total
    rank = choose_rank(s, cap, rule.dynamic, rule.value, exact_total)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    if rule.clamp_quantile is not None:
        bound = quantile(torch.cat([up.flatten(), down.flatten()]), rule.clamp_quantile)
        up, down = up.clamp(-bound, bound), down.clamp(-bound, bound)
    retained = float(s[:rank].pow(2).sum()) / total if total > 0 else 1.0
    if delta.dim() == 4:
        up = up.reshape(delta.shape[0], rank, 1, 1)
        down = down.reshape(rank, *delta.shape[1:])
    return Factors(up.contiguous(), down.contiguous(), rank, min(retained, 1.0))


def relative_error(delta: "torch.Tensor", factors: Factors) -> float:
    """‖delta − up·down‖_F / ‖delta‖_F."""
    matrix = delta.float().reshape(delta.shape[0], -1)
    product = factors.up.reshape(factors.up.shape[0], -1) @ factors.down.reshape(factors.rank, -1)
    norm = float(matrix.norm())
    return float((matrix - product).norm()) / norm if norm > 0 else 0.0
