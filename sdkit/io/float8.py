"""float8 (e4m3fn, e5m2) → float32, exactly as `tensor.to(torch.float32)`, several
times faster.

torch converts float8 to float32 one element at a time. Both formats are the top bits
of a float16 in disguise, and float16 → float32 runs vectorized:

- e5m2 (s eeeee mm) is the high byte of the float16 with the same value;
- e4m3fn (s eeee mmm), its exponent and mantissa moved 7 bits up with the sign kept, is
  the float16 of its value / 256 (normal and subnormal numbers alike: both biases
  differ by 8), so one exact multiplication by 256 follows.

Every finite value comes out bit for bit as torch's conversion. e4m3fn has no infinity
and its NaN (s 1111 111) would come out as ±480, outside its range (±448); a slice
holding a NaN or an infinity is converted by torch instead, so NaN payloads and signs
stay torch's too.
"""

from __future__ import annotations

import torch

_E4M3_MAX = 448.0
_CLEAR_BIT_14 = -0x4001  # 0b1011_1111_1111_1111 as int16: drops the sign-extension bit


def to_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor.to(torch.float32)`, by the fast exact route where the dtype has one (a
    float32 tensor is returned as it is, as `.to` does)."""
    if tensor.dtype == torch.float8_e4m3fn:
        return _widen(tensor, _e4m3fn_as_float32(tensor), _E4M3_MAX)
    if tensor.dtype == torch.float8_e5m2:
        return _widen(tensor, _e5m2_as_float32(tensor), float("inf"))
    return tensor.to(torch.float32)


def _e4m3fn_as_float32(tensor: torch.Tensor) -> torch.Tensor:
    # int8 → int16 sign-extends: s sssssss s eeee mmm; shifted left by 7 the sign sits in
    # bit 15 and a copy of it in bit 14, which is cleared: s 0 eeee mmm 0000000
    wide = (tensor.view(torch.int8).to(torch.int16) << 7) & _CLEAR_BIT_14
    return wide.view(torch.float16).to(torch.float32).mul_(256.0)


def _e5m2_as_float32(tensor: torch.Tensor) -> torch.Tensor:
    wide = tensor.view(torch.int8).to(torch.int16) << 8
    return wide.view(torch.float16).to(torch.float32)


def _widen(tensor: torch.Tensor, fast: torch.Tensor, limit: float) -> torch.Tensor:
    """`fast`, unless the slice holds a NaN or a value beyond the format (its NaN seen
    through the fast route): then torch's own conversion."""
    if fast.numel() == 0:
        return fast
    low, high = torch.aminmax(fast)
    if float(low) >= -limit and float(high) <= limit:
        return fast
    return tensor.to(torch.float32)
