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

    if delta.numel() == 0:
        return _empty_factors(tuple(delta.shape))
    cap = cap or rule.cap_for(tuple(delta.shape))
    matrix = delta.float().reshape(delta.shape[0], -1)
    cap = min(cap, *matrix.shape)
    u, s, vh = decompose(matrix, rule, cap)
    total = float(torch.linalg.vector_norm(matrix)) ** 2  # no squared copy of a large matrix
    return _truncated(u, s, vh, cap, rule, total, tuple(delta.shape))


def factorize_product(up: "torch.Tensor", down: "torch.Tensor", rule: RankRule,
                      cap: int | None = None) -> Factors:
    """`factorize(up @ down)` without forming the product: up (out, k[, 1, 1]) and down
    (k, in[, kh, kw]) span it, so the SVD of the small core of their QR factors is the
    product's (exact: the same numbers as the full SVD up to float rounding). Memory and
    time grow with (out + in) · k, not out · in: a 50 000 × 50 000 product of rank-8
    factors costs a few MB. A fixed rank above k keeps its size with zero components,
    as the full SVD's would be (up to rounding)."""
    shape = (up.shape[0], *down.shape[1:])
    left, right = up.float().flatten(1), down.float().flatten(1)
    if left.shape[0] == 0 or right.shape[1] == 0:
        return _empty_factors(shape)
    cap = min(cap or rule.cap_for(shape), left.shape[0], right.shape[1])
    u, s, vh = product_svd(left, right)
    u, s, vh = _zero_padded(u, s, vh, cap)
    return _truncated(u, s, vh, cap, rule, float(s.pow(2).sum()), shape)


def product_svd(left: "torch.Tensor", right: "torch.Tensor"
                ) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(U, S, Vh) of `left @ right` (m, k) @ (k, n), from `left = Q₁R₁`, `rightᵀ = Q₂R₂`:
    `left @ right = Q₁ (R₁R₂ᵀ) Q₂ᵀ`, and the core R₁R₂ᵀ is at most k × k."""
    import torch

    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.mT)
    u, s, vh = torch.linalg.svd(r_left @ r_right.mT, full_matrices=False)
    return q_left @ u, s, vh @ q_right.mT


def _empty_factors(shape: tuple[int, ...]) -> Factors:
    """A layer without values gets the rank-1 zero factors a zero delta gets."""
    import torch

    up = torch.zeros(shape[0], 1, *((1, 1) if len(shape) == 4 else ()))
    return Factors(up, torch.zeros(1, *shape[1:]), 1, 1.0)


def _zero_padded(u: "torch.Tensor", s: "torch.Tensor", vh: "torch.Tensor", count: int
                 ) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    import torch

    missing = count - len(s)
    if missing <= 0:
        return u, s, vh
    return (torch.cat([u, u.new_zeros(u.shape[0], missing)], 1), torch.cat([s, s.new_zeros(missing)]),
            torch.cat([vh, vh.new_zeros(missing, vh.shape[1])], 0))


def _truncated(u: "torch.Tensor", s: "torch.Tensor", vh: "torch.Tensor", cap: int, rule: RankRule,
               total: float, shape: tuple[int, ...]) -> Factors:
    """The factors of the chosen rank from an SVD: σ folded into up, clamped on request,
    shaped as the layer (4-D for convs)."""
    import torch

    exact_total = total if rule.randomized else None  # a randomized SVD lacks the tail
    rank = choose_rank(s, cap, rule.dynamic, rule.value, exact_total)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    if rule.clamp_quantile is not None:
        bound = quantile(torch.cat([up.flatten(), down.flatten()]), rule.clamp_quantile)
        up, down = up.clamp(-bound, bound), down.clamp(-bound, bound)
    retained = float(s[:rank].pow(2).sum()) / total if total > 0 else 1.0
    if len(shape) == 4:
        up = up.reshape(shape[0], rank, 1, 1)
        down = down.reshape(rank, *shape[1:])
    return Factors(up.contiguous(), down.contiguous(), rank, min(retained, 1.0))


def relative_error(delta: "torch.Tensor", factors: Factors) -> float:
    """‖delta − up·down‖_F / ‖delta‖_F."""
    matrix = delta.float().reshape(delta.shape[0], -1)
    product = factors.up.reshape(factors.up.shape[0], -1) @ factors.down.reshape(factors.rank, -1)
    norm = float(matrix.norm())
    return float((matrix - product).norm()) / norm if norm > 0 else 0.0
