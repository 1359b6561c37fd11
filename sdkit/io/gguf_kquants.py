"""K-quant quantizers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in numpy.

The `gguf` package dequantizes these types but cannot make them; llama.cpp makes them in
C (`ggml/src/ggml-quants.c`). With no importance matrix, `llama-quantize` (and
ComfyUI-GGUF's patched build of it) runs the reference row quantizers
`quantize_row_q2_K_ref` … `quantize_row_q6_K_ref`; this module follows those:

- a row is cut into super-blocks of 256 values, each cut into sub-blocks of 16 (Q2_K,
  Q3_K, Q6_K) or 32 (Q4_K, Q5_K) values;
- each sub-block gets its own scale (and, for Q2_K/Q4_K/Q5_K, a minimum) by the search
  llama.cpp uses: `make_qkx2_quants` (a grid of trial scales, least-squares refits of
  scale and minimum, weighted error), `make_q3_quants` (symmetric, then a few passes that
  move single levels while the weighted fit improves) or `make_qx_quants` (symmetric,
  trial scales -0.9..+0.9 around the largest value);
- the sub-block scales are quantized against a float16 super-block scale (4, 6 or 8
  bits), and the values are quantized again against the scales as stored.

Every loop over a block's values becomes an array operation over all blocks at once;
every sum runs left to right in float32 (`np.add.accumulate`), the order and precision
of the C loops, and rounding is to nearest, ties to even (llama.cpp's `nearest_int`).
Without fused multiply-adds (a portable build) the bytes are the C code's.

Byte layouts, one super-block each (as `gguf.quants` reads them):
Q2_K 84 B: scales[16] (low nibble scale, high nibble min), qs[64] (2 bits), d, dmin (f16);
Q3_K 110 B: hmask[32] (3rd bit), qs[64] (2 bits), scales[12] (6 bits, packed), d;
Q4_K 144 B: d, dmin, scales[12] (6-bit scale and min, packed), qs[128] (4 bits);
Q5_K 176 B: d, dmin, scales[12], qh[32] (5th bit), qs[128];
Q6_K 210 B: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

QK_K = 256
_EPS = np.float32(1e-15)  # llama.cpp's GROUP_MAX_EPS: a sub-block below it is all zero
_F = np.float32


def _sum(values: np.ndarray) -> np.ndarray:
    """Sum over the first axis (a sub-block's values), left to right in float32, as a C
    loop adds. Sub-blocks lie along the second axis, so each step adds one whole row."""
    total = values[0].copy()
    for row in values[1:]:
        total += row
    return total


def _levels(scaled: np.ndarray, low: int, high: int) -> np.ndarray:
    """nearest_int(scaled) clamped to [low, high], as float32 (exact small integers)."""
    return np.clip(np.rint(scaled), low, high).astype(np.float32)


def _to_int(values: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # values of blocks whose result is replaced anyway
        return np.nan_to_num(np.rint(values), nan=0.0, posinf=0.0, neginf=0.0).astype(np.int64)


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _f16_value(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


def _largest_magnitude(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the value of largest |x| along the first axis, first of equals, and that magnitude)."""
    at = np.abs(x).argmax(axis=0)[None]
    value = np.take_along_axis(x, at, axis=0)[0]
    return value, np.abs(value)


def _by_value(x: np.ndarray, size: int) -> np.ndarray:
    """Sub-blocks of `size` values as columns: row i holds value i of every sub-block."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


# ---- sub-block searches --------------------------------------------------------------------


def _weighted_error(scale: np.ndarray, levels: np.ndarray, low: np.ndarray, x: np.ndarray,
                    weights: np.ndarray, absolute: bool) -> np.ndarray:
    diff = scale * levels + low - x
    return _sum(weights * (np.abs(diff) if absolute else diff * diff))


def _scale_and_min(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                   nstep: int, absolute: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's `make_qkx2_quants` for rows of x: (scale, minimum to subtract, levels
    0..nmax). Trial inverse scales (nmax + rmin + rdelta*k) / (max - min) for k = 0..nstep,
    each refitted by weighted least squares; the best by weighted error wins, and later
    trials measure from the minimum found so far, as in C."""
    low = np.minimum(x.min(axis=0), 0).astype(np.float32)
    high = x.max(axis=0)
    flat = high == low
    sum_w, sum_x = _sum(weights), _sum(weights * x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F(nmax) / (high - low)
        scale = _F(1) / iscale
        levels = _levels(iscale * (x - low), 0, nmax)
        best = _weighted_error(scale, levels, low, x, weights, absolute)
        for step in range(nstep + 1):
            iscale = (_F(rmin) + _F(rdelta) * _F(step) + _F(nmax)) / (high - low)
            trial = _levels(iscale * (x - low), 0, nmax)
            weighted = weights * trial
            sum_l, sum_l2, sum_xl = _sum(weighted), _sum(weighted * trial), _sum(weighted * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0  # a minimum above zero is dropped, the scale refitted alone
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, _F(0), this_min)
            error = _weighted_error(this_scale, trial, this_min, x, weights, absolute)
            better = (det > 0) & (error < best)
            levels = np.where(better, trial, levels)
            best = np.where(better, error, best)
            scale = np.where(better, this_scale, scale)
            low = np.where(better, this_min, low)
    scale = np.where(flat, _F(0), scale)
    levels = np.where(flat, _F(0), levels)
    return scale, -low, levels


def _symmetric_refined(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's `make_q3_quants` with do_rmse: (scale, levels 0..2*nmax-1). Levels
    -nmax..nmax-1 from the largest value, then up to five passes that move one level at a
    time (value by value, in order) while the x²-weighted fit improves."""
    peak, magnitude = _largest_magnitude(x)
    zero = magnitude < _EPS
    weights = x * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F(-nmax) / peak
        levels = _levels(iscale * x, -nmax, nmax - 1)
        sumlx, suml2 = _sum(weights * x * levels), _sum(weights * levels * levels)
        active = ~zero
        for _ in range(5):
            changed = np.zeros_like(active)
            for i in range(x.shape[0]):
                xi, wi, li = x[i], weights[i], levels[i]
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new = _levels(xi * sl2 / slx, -nmax, nmax - 1)
                slx_new, sl2_new = slx + wi * xi * new, sl2 + wi * new * new
                accept = active & (slx > 0) & (new != li) & (sl2_new > 0) & \
                    (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
                levels[i] = np.where(accept, new, li)
                sumlx = np.where(accept, slx_new, sumlx)
                suml2 = np.where(accept, sl2_new, suml2)
                changed |= accept
            active &= changed
            if not active.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, _F(0))
    return np.where(zero, _F(0), scale), np.where(zero, _F(0), levels + _F(nmax))


def _symmetric_searched(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's `make_qx_quants` with rmse_type 1 and no importance: (scale, levels
    0..2*nmax-1). Inverse scales -(nmax + 0.1*k)/max for k = -9..9, x²-weighted; the
    best least-squares fit wins."""
    peak, magnitude = _largest_magnitude(x)
    zero = magnitude < _EPS
    weights = x * x
    weighted_x = weights * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        signed = _levels(_F(-nmax) / peak * x, -nmax, nmax - 1)
        sumlx, suml2 = _sum(weighted_x * signed), _sum(weights * signed * signed)
        scale = np.where(suml2 != 0, sumlx / suml2, _F(0))
        best = scale * sumlx
        levels = signed + _F(nmax)
        for step in (*range(-9, 0), *range(1, 10)):
            iscale = -(_F(nmax) + _F(0.1) * _F(step)) / peak
            trial = _levels(iscale * x, -nmax, nmax - 1)
            sumlx, suml2 = _sum(weighted_x * trial), _sum(weights * trial * trial)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            levels = np.where(better, trial + _F(nmax), levels)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    return np.where(zero, _F(0), scale), np.where(zero, _F(0), levels)


def _largest_signed(scales: np.ndarray) -> np.ndarray:
    """Per super-block (row), the sub-block scale of largest magnitude (first of equals), sign kept."""
    return _largest_magnitude(scales.T)[0]


# ---- packing ---------------------------------------------------------------------------------


def _two_bit_planes(levels: np.ndarray) -> np.ndarray:
    """qs of Q2_K/Q3_K: per 128 values, byte l holds values l, l+32, l+64, l+96 (2 bits each)."""
    parts = levels.astype(np.uint8).reshape(-1, 2, 4, 32)
    packed = parts[:, :, 0] | parts[:, :, 1] << 2 | parts[:, :, 2] << 4 | parts[:, :, 3] << 6
    return packed.reshape(-1, 64)


def _pack_scales_mins(scale_levels: np.ndarray, min_levels: np.ndarray) -> np.ndarray:
    """The 12 bytes of Q4_K/Q5_K: eight 6-bit scales and mins (llama.cpp's get_scale_min_k4)."""
    ls, lm = scale_levels.astype(np.uint8), min_levels.astype(np.uint8)
    packed = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | (ls[:, 4:8] >> 4) << 6
    packed[:, 4:8] = lm[:, 0:4] | (lm[:, 4:8] >> 4) << 6
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | (lm[:, 4:8] & 0xF) << 4
    return packed


def _requantized(x: np.ndarray, step: np.ndarray, offset: np.ndarray | None, levels: np.ndarray,
                 low: int, high: int) -> np.ndarray:
    """Values against the scales as stored; a sub-block whose step is zero keeps the levels
    of its search (C's `if (!d) continue`)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        shifted = x if offset is None else x + offset[..., None]
        again = _levels(shifted / step[..., None], low, high)
    return np.where((step != 0)[..., None], again, levels)


# ---- super-blocks ---------------------------------------------------------------------------


def _asymmetric_scales(scale: np.ndarray, mins: np.ndarray, bits_max: float
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scale levels, min levels, d, dmin as float16 values) of Q4_K/Q5_K: sub-block scales
    and mins against the largest of each, in 6 bits."""
    max_scale = np.maximum(scale.max(axis=-1), 0)
    max_min = np.maximum(mins.max(axis=-1), 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, _F(bits_max) / max_scale, _F(0))
        inv_min = np.where(max_min > 0, _F(bits_max) / max_min, _F(0))
    ls = np.minimum(_to_int(inv_scale[:, None] * scale) & 0xFF, 63)
    lm = np.minimum(_to_int(inv_min[:, None] * mins) & 0xFF, 63)
    return ls, lm, _f16_value(max_scale / _F(bits_max)), _f16_value(max_min / _F(bits_max))


def _q2_k(x: np.ndarray) -> np.ndarray:
    sub = _by_value(x, 16)
    scale, mins, levels = _scale_and_min(sub, np.abs(sub), 3, -0.5, 0.1, 15, absolute=True)
    scale, mins, levels = scale.reshape(-1, 16), mins.reshape(-1, 16), levels.T.reshape(-1, 16, 16)
    max_scale = np.maximum(scale.max(axis=-1), 0)
    max_min = np.maximum(mins.max(axis=-1), 0)
    q4 = _F(15)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(max_scale[:, None] > 0, _to_int((q4 / max_scale)[:, None] * scale), 0)
        lm = np.where(max_min[:, None] > 0, _to_int((q4 / max_min)[:, None] * mins), 0)
    packed = ((ls & 0xFF) | (lm << 4)) & 0xFF
    d = np.where(max_scale > 0, _f16_value(max_scale / q4), _F(0))
    dmin = np.where(max_min > 0, _f16_value(max_min / q4), _F(0))
    step = d[:, None] * (packed & 0xF).astype(np.float32)
    offset = dmin[:, None] * (packed >> 4).astype(np.float32)
    levels = _requantized(x.reshape(-1, 16, 16), step, offset, levels, 0, 3)
    return np.concatenate([packed.astype(np.uint8), _two_bit_planes(levels), _f16_bytes(d), _f16_bytes(dmin)],
                          axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    scale, levels = _symmetric_refined(_by_value(x, 16), 4)
    scale, levels = scale.reshape(-1, 16), levels.T.reshape(-1, 16, 16)
    max_scale = _largest_signed(scale)
    with np.errstate(divide="ignore"):
        iscale = np.where(max_scale != 0, _F(-32) / max_scale, _F(0))
    stored = np.where(max_scale[:, None] != 0, np.clip(_to_int(iscale[:, None] * scale), -32, 31) + 32, 0)
    packed = np.zeros((x.shape[0], 12), dtype=np.int64)
    packed[:, 0:8] = (stored[:, 0:8] & 0xF) | (stored[:, 8:16] & 0xF) << 4
    high = stored >> 4  # two bits per scale: scale j in byte 8 + j%4 at bit 2*(j//4)
    packed[:, 8:12] = high[:, 0:4] | high[:, 4:8] << 2 | high[:, 8:12] << 4 | high[:, 12:16] << 6
    with np.errstate(divide="ignore"):
        d = np.where(max_scale != 0, _f16_value(_F(1) / iscale), _F(0))
    step = d[:, None] * (stored - 32).astype(np.float32)
    signed = _requantized(x.reshape(-1, 16, 16), step, None, levels - _F(4), -4, 3) + _F(4)
    levels = signed.reshape(-1, 256).astype(np.uint8)
    upper = levels > 3  # the third bit: value j in hmask[j % 32], bit j // 32
    hmask = np.zeros((x.shape[0], 32), dtype=np.uint8)
    for bit in range(8):
        hmask |= upper[:, 32 * bit:32 * (bit + 1)].astype(np.uint8) << bit
    low_bits = np.where(upper, levels - 4, levels)
    return np.concatenate([hmask, _two_bit_planes(low_bits), packed.astype(np.uint8), _f16_bytes(d)], axis=1)


def _q45_k(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """(the 16-byte head d|dmin|scales, levels 0..nmax) of Q4_K (nmax 15) or Q5_K (31)."""
    sub = _by_value(x, 32)
    average = np.sqrt(_sum(sub * sub) / _F(32))
    weights = average + np.abs(sub)
    scale, mins, levels = _scale_and_min(sub, weights, nmax, rmin, 0.1, nstep, absolute=False)
    ls, lm, d, dmin = _asymmetric_scales(scale.reshape(-1, 8), mins.reshape(-1, 8), 63)
    step = d[:, None] * ls.astype(np.float32)
    offset = dmin[:, None] * lm.astype(np.float32)
    levels = _requantized(x.reshape(-1, 8, 32), step, offset, levels.T.reshape(-1, 8, 32), 0, nmax)
    head = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_mins(ls, lm)], axis=1)
    return head, levels.reshape(-1, 4, 2, 32).astype(np.uint8)


def _q4_k(x: np.ndarray) -> np.ndarray:
    head, levels = _q45_k(x, 15, -1.0, 20)
    qs = levels[:, :, 0] | levels[:, :, 1] << 4
    return np.concatenate([head, qs.reshape(-1, 128)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    head, levels = _q45_k(x, 31, -0.5, 15)
    qs = (levels[:, :, 0] & 0xF) | (levels[:, :, 1] & 0xF) << 4
    fifth = levels >> 4  # value 64n + j (+32): qh[j] bit 2n (2n + 1)
    qh = np.zeros((x.shape[0], 32), dtype=np.uint8)
    for n in range(4):
        qh |= fifth[:, n, 0] << (2 * n) | fifth[:, n, 1] << (2 * n + 1)
    return np.concatenate([head, qh, qs.reshape(-1, 128)], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    scale, levels = _symmetric_searched(_by_value(x, 16), 32)
    scale, levels = scale.reshape(-1, 16), levels.T.reshape(-1, 16, 16)
    max_scale = _largest_signed(scale)
    zero = np.abs(max_scale) < _EPS
    with np.errstate(divide="ignore"):
        iscale = np.where(zero, _F(0), _F(-128) / max_scale)
        d = np.where(zero, _F(0), _f16_value(_F(1) / iscale))
    stored = np.where(zero[:, None], 0, np.minimum(_to_int(iscale[:, None] * scale), 127))
    step = d[:, None] * stored.astype(np.float32)
    signed = _requantized(x.reshape(-1, 16, 16), step, None, levels - _F(32), -32, 31) + _F(32)
    parts = np.where(zero[:, None, None], 0, signed).reshape(-1, 2, 4, 32).astype(np.uint8)
    low = parts & 0xF
    ql = np.concatenate([low[:, :, 0] | low[:, :, 2] << 4, low[:, :, 1] | low[:, :, 3] << 4], axis=2)
    high = parts >> 4
    qh = high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), stored.astype(np.int8).view(np.uint8),
                           _f16_bytes(d)], axis=1)


QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
# super-blocks quantized at once. The searches make hundreds of passes over their arrays:
# at 512 super-blocks (512 KiB of float32 each) they stay in the core's cache and are
# reused by the allocator, where 4096 (4 MiB) made every temporary a fresh mapping and
# every pass a trip to memory (Q4_K about twice as slow)
_BLOCKS_AT_ONCE = 512


def quantize_k(values: np.ndarray, kind: str) -> np.ndarray:
    """Rows of `values` (last axis a multiple of 256) as `kind` blocks: uint8, the shape of
    `values` with the last axis in bytes (as `gguf.quants.quantize` returns)."""
    if kind not in QUANTIZERS:
        raise ValueError(f"not a K-quant type: {kind}")
    if values.shape[-1] % QK_K:
        raise ValueError(f"rows of {values.shape[-1]} values do not fill {QK_K}-value blocks")
    blocks = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, QK_K)
    quantize = QUANTIZERS[kind]
    parts = [quantize(blocks[start:start + _BLOCKS_AT_ONCE]) for start in range(0, len(blocks), _BLOCKS_AT_ONCE)]
    stored = np.concatenate(parts) if parts else np.zeros((0, _type_size(kind)), dtype=np.uint8)
    return stored.reshape(*values.shape[:-1], values.shape[-1] // QK_K * stored.shape[-1])


def _type_size(kind: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1]
