"""sdkit's numpy K-quant quantizers (Q2_K … Q6_K) against llama.cpp's reference rows.

Three kinds of check:
- bytes: the digests below are of the blocks that llama.cpp's reference row functions
  (`quantize_row_q2_K_ref` … `quantize_row_q6_K_ref` and the searches they call, from
  `ggml/src/ggml-quants.c`, transcribed to C and compiled with gcc -O2
  -ffp-contract=off, i.e. without fused multiply-adds) make from `structured_rows()`;
  sdkit's blocks must be the same bytes;
- values: blocks are read back with the `gguf` package's own dequantizer (the peer that
  ComfyUI-GGUF's loader also follows), and the error on Gaussian data stays inside a
  bound derived from the format (below);
- the layout round trip: re-quantizing dequantized blocks gives the same values.
"""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest

from sdkit.io.gguf_kquants import QK_K, quantize_k

KINDS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
REFERENCE_DIGESTS = {
    "Q2_K": "35e44028d144ccce62b54620c0974b85144c6372161d81b47279bce18cff486c",
    "Q3_K": "1abb703903e0b3c2bfb36cc914a005c075912c05f84719d14370cba55c942139",
    "Q4_K": "0c272b242b52b6b470f4501bf913f5c391264a841c76d530e347462bcc47c975",
    "Q5_K": "cb18752f3a8f9fbd39ac0e2f77823f7c99e14ff33f1cc8ec57b416d61acf5df5",
    "Q6_K": "786e4222eade522654889df1811f8a620a5d273bdb4786e0ebdc19f60b411862",
}
# Relative RMS error bound on standard normal data, from each format's step: a uniform
# quantizer of step s has RMS error s/sqrt(12).
# Q6_K: 64 signed levels over a 16-value sub-block's largest |x| (~2 sigma): s ~ 2/32;
#       1.8 %, bound 2.5 %.
# Q5_K: 32 levels over a 32-value sub-block's range (~4 sigma): s ~ 4/31; 3.7 %, bound 4.5 %.
# Q4_K: 16 levels over the same range: s ~ 4/15; 7.7 %, bound 8.5 %.
# Q3_K: 8 signed levels over ~2 sigma: s ~ 2/4; 14 %, bound 17 %.
# Q2_K: 4 levels over a 16-value range (~3.5 sigma): s ~ 3.5/3; 34 % before the search for
#       the best scale and minimum, which llama.cpp measures by absolute error; bound 33 %.
RMS_BOUND = {"Q6_K": 0.025, "Q5_K": 0.045, "Q4_K": 0.085, "Q3_K": 0.17, "Q2_K": 0.33}


def structured_rows() -> np.ndarray:
    """8 rows of 512 values from integer arithmetic only (the same floats everywhere):
    scales 2**-4 .. 2**3, a cubed (heavy-tailed) row, an all-positive row, a row with
    every third value zero."""
    index = np.arange(512, dtype=np.int64)
    rows = []
    for row in range(8):
        base = (((index * 7919 + row * 104729) % 2001) - 1000).astype(np.float64) / 997.0
        if row == 5:
            base = base ** 3
        if row == 6:
            base = np.abs(base) + 0.25
        if row == 7:
            base = np.where(index % 3 == 0, 0.0, base)
        rows.append(base * 2.0 ** (row - 4))
    return np.array(rows, dtype=np.float32)


def dequantized(blocks: np.ndarray, kind: str) -> np.ndarray:
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_bytes_are_llama_cpp_reference_bytes(kind):
    blocks = quantize_k(structured_rows(), kind)
    assert blocks.dtype == np.uint8
    assert blocks.shape == (8, 2 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1])
    assert hashlib.sha256(blocks.tobytes()).hexdigest() == REFERENCE_DIGESTS[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_gaussian_error_within_the_format_bound(kind):
    values = np.random.default_rng(0).standard_normal((32, 4096)).astype(np.float32)
    back = dequantized(quantize_k(values, kind), kind)
    relative = float(np.sqrt(((back - values) ** 2).sum() / (values ** 2).sum()))
    assert relative < RMS_BOUND[kind], relative
    # and no worse than a quarter below the bound either: a broken search that still
    # lands inside the bound by luck would show as a jump here
    assert relative > RMS_BOUND[kind] * 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_structured_blocks(kind):
    rows = np.zeros((6, QK_K), dtype=np.float32)
    rows[1] = 0.3  # constant
    rows[2] = -0.3
    rows[3, 17] = 5.0  # one spike in a zero block
    rows[4] = np.linspace(-1e4, 1e4, QK_K)  # large values
    rows[5] = np.linspace(-1e-6, 3e-6, QK_K)  # tiny values
    back = dequantized(quantize_k(rows, kind), kind)
    assert np.isfinite(back).all()
    assert np.array_equal(back[0], rows[0])  # zeros stay zeros
    span = np.abs(rows[1:5]).max(axis=1, keepdims=True)
    error = np.abs(back[1:5] - rows[1:5]).max(axis=1, keepdims=True)
    # at worst half a step of 3 levels (Q2_K) over a sub-block's range, which is at most
    # the row's 2x largest magnitude
    assert (error <= span * 2 / 3).all(), (error / span).ravel()
    # the super-block scales are float16: steps below its smallest subnormal (6e-8) are
    # zero, so values of a few 1e-6 may all come back as 0 (as llama.cpp's do), never larger
    assert np.abs(back[5]).max() <= np.abs(rows[5]).max() * 1.5
    assert np.allclose(back[1], 0.3, rtol=0.02) and np.allclose(back[2], -0.3, rtol=0.02)


@pytest.mark.parametrize("kind", ("Q4_K", "Q6_K"))
def test_requantizing_dequantized_blocks_keeps_their_values(kind):
    """Values already on a Q4_K / Q6_K grid come back as the same values (the search
    finds their own scales again): a GGUF file re-quantized to its own type is unchanged."""
    values = np.random.default_rng(1).standard_normal((16, 2048)).astype(np.float32)
    once = dequantized(quantize_k(values, kind), kind)
    twice = dequantized(quantize_k(once, kind), kind)
    assert np.array_equal(once, twice)


def test_rows_must_fill_whole_blocks():
    with pytest.raises(ValueError, match="256"):
        quantize_k(np.zeros((2, 100), dtype=np.float32), "Q4_K")
    with pytest.raises(ValueError, match="K-quant"):
        quantize_k(np.zeros((2, 256), dtype=np.float32), "Q8_0")
