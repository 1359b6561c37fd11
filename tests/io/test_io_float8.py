"""float8 → float32 by the fast route is torch's conversion, bit for bit."""

from __future__ import annotations

import pytest
import torch

from sdkit.io.float8 import to_float32

FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def same_bits(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return ours.dtype == theirs.dtype and torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


@pytest.mark.parametrize("dtype", FLOAT8)
def test_every_bit_pattern_converts_as_torch_does(dtype: torch.dtype) -> None:
    patterns = torch.arange(256, dtype=torch.uint8).view(dtype)
    expected = patterns.to(torch.float32)
    assert same_bits(to_float32(patterns), expected)  # NaN (and e5m2's Inf) among them: torch's route
    one_by_one = torch.cat([to_float32(patterns[i:i + 1]) for i in range(256)])
    assert same_bits(one_by_one, expected)
    finite = patterns[torch.isfinite(expected)]
    assert same_bits(to_float32(finite), finite.to(torch.float32))  # the fast route alone


@pytest.mark.parametrize("dtype", FLOAT8)
def test_shapes_and_large_slices(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    values = (torch.randn(3, 1000, 7, generator=generator) * 40).to(dtype)
    out = to_float32(values)
    assert out.shape == values.shape and same_bits(out, values.to(torch.float32))
    assert to_float32(values[:0]).shape == (0, 1000, 7)


def test_other_dtypes_go_through_torch() -> None:
    half = torch.randn(10).half()
    assert same_bits(to_float32(half), half.to(torch.float32))
    single = torch.randn(10)
    assert to_float32(single) is single
