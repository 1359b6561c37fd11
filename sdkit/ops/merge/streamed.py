"""The merge methods that are not elementwise (TIES, DARE, SLERP), computed a slice of a
tensor at a time, with the same numbers as their whole-tensor forms in `methods`.

A streamed method reads its inputs through a `SliceReader` (flattened, float32, one
slice at a time, as many passes as it needs) and yields the output slice by slice, so
its working set is a few slices whatever the tensor size:

- TIES needs, per task vector, the magnitude of its ceil(k·n)-th largest entry. Two
  counting passes find it exactly: a non-negative float32 orders like its bit pattern,
  so a histogram of the top 16 bits names the bucket that holds it, and a histogram of
  the low 16 bits of the entries inside that bucket names the value itself (ties
  included). Over float8 inputs one pass counts (byte of M, byte of A) pairs instead:
  they are every value |M − A| can take. A last pass writes the output; the sign
  election is per element.
- DARE's masks come from one generator per (seed, input, key), drawn in element order:
  torch's CPU `rand` draws one number per element, in order, so consecutive slices of
  the stream are the whole-tensor draw cut in pieces — the same masks as a whole-tensor
  draw.
- SLERP needs |A|, |B| and A·B: one pass sums them over fixed slices in float64 (the
  slices and the order of the whole-tensor form, so the same sums), a second writes
  the output.

The slices of a pass are made on a small thread pool (`mapped`), in order where order
matters: counts add up in any order, sums are added in slice order, and DARE's draws
run on a thread per input, in slice order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from sdkit.io.ahead import DEFAULT_WORKERS, in_parallel
from sdkit.io.float8 import to_float32

T = TypeVar("T")

# reductions (norms, dot products) run over fixed slices in float64 so that their result
# does not depend on how many threads torch uses to sum, nor on how a tensor is read
REDUCE_SLICE = 1 << 20
# elementwise passes: 1 MiB per float32 operand (the operands stay in cache)
PASS_SLICE = 1 << 18

_HIGH_BUCKETS = 1 << 15  # the top 16 bits of a non-negative float32 (sign bit 0)
_LOW_BUCKETS = 1 << 16
_MAGNITUDE = 0x7FFFFFFF


@dataclass(frozen=True)
class SliceReader:
    """The inputs of one key, flattened and read a slice at a time as float32.

    `read(start, size)` returns elements [start, start + size) of every input; each call
    of `slices` is one pass. Slices may be views of the inputs: never modify them.
    `random_access`: reads may come in any order and from several threads at once (a
    reader over values made in order, an earlier step's output, has neither). `stored`,
    where every input has one: the same elements as stored (float8 not widened)."""

    count: int  # elements per input
    inputs: int
    read: Callable[[int, int], list[Tensor]]
    random_access: bool = True
    stored: Callable[[int, int], list[Tensor]] | None = None

    def slices(self, size: int) -> Iterator[tuple[int, list[Tensor]]]:
        for start in range(0, self.count, size):
            yield start, self.read(start, min(size, self.count - start))


def tensor_reader(tensors: Sequence[Tensor]) -> SliceReader:
    """A reader over tensors already at hand (memory-mapped or loaded)."""
    flat = [tensor.reshape(-1) for tensor in tensors]

    def stored(start: int, size: int) -> list[Tensor]:
        return [part[start:start + size] for part in flat]

    return SliceReader(flat[0].numel(), len(flat), lambda start, size: list(map(to_float32, stored(start, size))),
                       stored=stored)


def joined_reader(readers: Sequence[SliceReader]) -> SliceReader:
    """One reader over the inputs of several, in order (all of one element count)."""

    def read(start: int, size: int) -> list[Tensor]:
        return [part for reader in readers for part in reader.read(start, size)]

    def stored(start: int, size: int) -> list[Tensor]:
        return [part for reader in readers for part in reader.stored(start, size)]  # type: ignore[misc]

    return SliceReader(readers[0].count, sum(reader.inputs for reader in readers), read,
                       all(reader.random_access for reader in readers),
                       stored if all(reader.stored is not None for reader in readers) else None)


def stream_reader(count: int, produce: Callable[[], Iterator[Tensor]]) -> SliceReader:
    """A reader over one input whose values come out in order, in pieces of any size
    (an earlier merge step's output, made as it is read): a read goes on where the last
    one stopped; a read further back (a method's next pass) produces them again from
    the start. Only the piece being read is held."""
    return SliceReader(count, 1, _Cursor(produce).read, random_access=False)


class _Cursor:
    def __init__(self, produce: Callable[[], Iterator[Tensor]]) -> None:
        self._produce = produce
        self._stream: Iterator[Tensor] | None = None
        self._pending = torch.empty(0)  # produced, not read yet
        self._position = 0  # the index of its first element

    def read(self, start: int, size: int) -> list[Tensor]:
        if self._stream is None or start < self._position:
            self._stream, self._pending, self._position = iter(self._produce()), torch.empty(0), 0
        self._take(start - self._position)
        return [torch.cat(self._take(size)) if size else torch.empty(0)]

    def _take(self, size: int) -> list[Tensor]:
        """The next `size` values, in the pieces they came in."""
        parts = []
        while size > 0:
            if self._pending.numel() == 0:
                self._pending = next(self._stream).reshape(-1)  # type: ignore[arg-type]
            part = self._pending[:size]
            parts.append(part)
            self._pending = self._pending[part.numel():]
            self._position += part.numel()
            size -= part.numel()
        return parts


# ---------------------------------------------------------------- shared with methods


def disjoint_mean(deltas: list[Tensor]) -> Tensor:
    """Mean over the deltas whose sign matches the sign of their sum (zeros excluded)."""
    elected = torch.sign(torch.stack(deltas).sum(dim=0)) if len(deltas) > 1 else torch.sign(deltas[0])
    total = torch.zeros_like(deltas[0])
    agreeing = torch.zeros_like(deltas[0])
    for delta in deltas:
        agrees = (torch.sign(delta) == elected) & (delta != 0)
        total += torch.where(agrees, delta, 0.0)
        agreeing += agrees
    return torch.where(agreeing > 0, total / agreeing.clamp_min(1.0), 0.0)


def plain_sum(tensors: list[Tensor]) -> Tensor:
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total


def key_seed(seed: int, index: int, key: str) -> int:
    """A 63-bit seed for one (seed, input index, key) triple."""
    digest = hashlib.sha256(f"{seed}\0{index}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def dare_generators(seed: int, key: str, models: int) -> list[torch.Generator]:
    """The mask generator of each input B, C, … (index 1 on) for one key."""
    return [torch.Generator().manual_seed(key_seed(seed, index, key)) for index in range(1, models + 1)]


def dare_slice(base: Tensor, models: Sequence[Tensor], draws: Sequence[Tensor],
               alpha: float, p: float, ties: bool) -> Tensor:
    """DARE on one slice, given each input's uniform draws for it."""
    rescaled = [_dropped((model - base) / (1.0 - p), drawn, p) for model, drawn in zip(models, draws)]
    combined = disjoint_mean(rescaled) if ties else plain_sum(rescaled)
    return base + alpha * combined


def _dropped(delta: Tensor, draws: Tensor, p: float) -> Tensor:
    """`where(draws >= p, delta, 0)` as far as the merged output can tell, in vectorized
    float arithmetic where delta is finite: draws >= p (compared in float32) is draws
    above the float32 just below float32(p), whose sign is the 1/0 indicator. The one
    difference, a kept −0 coming out +0, occurs only where A is +0 (M − A = −0 needs
    M = −0, A = +0), so A + alpha·(sum or disjoint mean) is the same there: zeros
    neither change a sum's other terms nor take part in the disjoint mean."""
    if not _finite(delta):
        return torch.where(draws >= p, delta, 0.0)
    if p == 0.0:  # every draw is at least 0
        return delta
    below = float(torch.nextafter(torch.tensor(p, dtype=torch.float32), torch.tensor(0.0)))
    return torch.threshold(draws, below, 0.0).sign_().mul_(delta).add_(0.0)


def ties_slice(base: Tensor, models: Sequence[Tensor], thresholds: Sequence[float | None],
               alpha: float) -> Tensor:
    """TIES on one slice, given each task vector's trim threshold."""
    deltas = [model - base for model in models]
    if all(_finite(delta) for delta in deltas):
        return base + alpha * _disjoint_mean_of_finite([_trim_finite(d, t) for d, t in zip(deltas, thresholds)])
    trimmed = [delta if threshold is None else torch.where(delta.abs() >= threshold, delta, 0.0)
               for delta, threshold in zip(deltas, thresholds)]
    return base + alpha * disjoint_mean(trimmed)


def _finite(tensor: Tensor) -> bool:
    low, high = torch.aminmax(tensor)  # NaN propagates through it
    return -math.inf < float(low) and float(high) < math.inf


def _trim_finite(delta: Tensor, threshold: float | None) -> Tensor:
    """`where(|delta| >= threshold, delta, 0)` for a finite delta, bit for bit, from two
    vectorized `threshold` calls (a comparison making a bool mask and `where` reading
    it run one element at a time, ten times slower): x > the float32 just below the
    threshold is x >= the threshold."""
    if threshold is None or threshold == 0.0:  # every finite entry kept
        return delta
    below = float(torch.nextafter(torch.tensor(threshold), torch.tensor(0.0)))
    return torch.threshold(delta, below, 0.0) - torch.threshold(-delta, below, 0.0)


def _disjoint_mean_of_finite(deltas: list[Tensor]) -> Tensor:
    """`disjoint_mean` of finite deltas, bit for bit, in float arithmetic only: an entry
    agrees with the elected sign e where delta·e > 0, so sign(max(delta·e, 0)) is its
    1/0 indicator; where nothing agrees the total is +0, and +0 / 1 is what
    `disjoint_mean` returns there. Two deltas are summed by one addition (the stacked
    sum's value; only the sign of a zero sum may differ, and a zero elects nothing: the
    ±0 it adds leaves the +0 total and count as they are)."""
    if len(deltas) == 2:
        elected = torch.sign(deltas[0] + deltas[1])
    else:
        elected = torch.sign(torch.stack(deltas).sum(dim=0)) if len(deltas) > 1 else torch.sign(deltas[0])
    total = torch.zeros_like(deltas[0])
    agreeing = torch.zeros_like(deltas[0])
    for delta in deltas:
        agrees = (delta * elected).clamp_min_(0.0).sign_()
        total += delta * agrees
        agreeing += agrees
    return total / agreeing.clamp_min_(1.0)


def slerp_weights(norm_a: float, norm_b: float, dot_ab: float, alpha: float) -> tuple[float, float] | None:
    """The weights of A and B, or None where SLERP falls back to a weighted sum (a zero
    or non-finite norm; parallel or anti-parallel A and B)."""
    if norm_a == 0.0 or norm_b == 0.0 or not math.isfinite(norm_a * norm_b):
        return None
    cosine = max(-1.0, min(1.0, dot_ab / (norm_a * norm_b)))
    omega = math.acos(cosine)
    sin_omega = math.sin(omega)
    if sin_omega < 1e-6:
        return None
    norm = (1.0 - alpha) * norm_a + alpha * norm_b
    weight_a = math.sin((1.0 - alpha) * omega) / sin_omega * norm / norm_a
    weight_b = math.sin(alpha * omega) / sin_omega * norm / norm_b
    return weight_a, weight_b


def slice_dot(a: Tensor, b: Tensor) -> float:
    """sum(a·b) of one reduction slice, in float64."""
    return float(torch.dot(a.double(), b.double()))


def bucket_at_rank(histogram: Tensor, rank: int) -> tuple[int, int]:
    """(the bucket holding the rank-th largest entry, its rank inside that bucket)."""
    at_or_above = histogram.flip(0).cumsum(0).flip(0)  # entries in this bucket or a higher one
    bucket = int((at_or_above >= rank).nonzero().max())
    above = int(at_or_above[bucket + 1]) if bucket + 1 < len(at_or_above) else 0
    return bucket, rank - above


def magnitude_bits(model: Tensor, base: Tensor) -> Tensor:
    """|model − base| as the int32 bit patterns of the float32 values (which order alike)."""
    return (model - base).abs_().view(torch.int32) & _MAGNITUDE


# ---------------------------------------------------------------- streamed methods


def ties(reader: SliceReader, *, alpha: float = 1.0, k: float = 0.2) -> Iterator[Tensor]:
    """TIES, streamed: counting passes for the trim thresholds (one over float8 inputs,
    two otherwise), then the output."""
    thresholds = top_fraction_thresholds(reader, k)
    yield from mapped(reader, PASS_SLICE, lambda parts: ties_slice(parts[0], parts[1:], thresholds, alpha))


def dare(reader: SliceReader, *, alpha: float = 1.0, p: float = 0.9, seed: int = 0,
         ties: bool = False, key: str = "") -> Iterator[Tensor]:
    """DARE, streamed: one pass; each input's mask stream is drawn slice after slice, in
    order, on a thread of its own (the draws are a sequential stream per input, and take
    as long as the rest of the slice's work), while the slices are made on the pool."""
    generators = dare_generators(seed, key, reader.inputs - 1)
    with ExitStack() as stack:
        drawers = [stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="sdkit-draws")) for _ in generators]

        def draws(size: int) -> list[Future[Tensor]]:  # asked for in slice order
            return [drawer.submit(torch.rand, size, generator=generator)
                    for drawer, generator in zip(drawers, generators)]

        def made(parts: list[Tensor], drawn: list[Future[Tensor]]) -> Tensor:
            return dare_slice(parts[0], parts[1:], [future.result() for future in drawn], alpha, p, ties)

        yield from mapped(reader, PASS_SLICE, made, along=draws)


def slerp(reader: SliceReader, *, alpha: float = 0.5) -> Iterator[Tensor]:
    """SLERP, streamed: one pass for |A|, |B| and A·B (summed in slice order), one for the
    output."""
    squares_a = squares_b = dot_ab = 0.0
    for a_a, b_b, a_b in mapped(reader, REDUCE_SLICE, _slerp_sums):
        squares_a, squares_b, dot_ab = squares_a + a_a, squares_b + b_b, dot_ab + a_b
    weights = slerp_weights(math.sqrt(squares_a), math.sqrt(squares_b), dot_ab, alpha)
    yield from mapped(reader, PASS_SLICE, lambda parts: _slerp_slice(parts, weights, alpha))


def _slerp_sums(parts: list[Tensor]) -> tuple[float, float, float]:
    a, b = parts
    return slice_dot(a, a), slice_dot(b, b), slice_dot(a, b)


def _slerp_slice(parts: list[Tensor], weights: tuple[float, float] | None, alpha: float) -> Tensor:
    a, b = parts
    return torch.lerp(a, b, alpha) if weights is None else a * weights[0] + b * weights[1]


def top_fraction_thresholds(reader: SliceReader, fraction: float) -> list[float | None]:
    """For each task vector M − A (inputs B, C, … against A): the magnitude of its
    ceil(fraction·n)-th largest entry, or None when every entry is kept. Two passes, each
    holding one histogram per task vector (and one per slice in flight: counts add up
    in any order)."""
    models = reader.inputs - 1
    keep = math.ceil(fraction * reader.count)
    if reader.count == 0 or keep >= reader.count:
        return [None] * models
    if reader.stored is not None and all(part.dtype.itemsize == 1 and part.dtype.is_floating_point
                                         for part in reader.stored(0, 0)):
        return _byte_pair_thresholds(reader, keep)
    high = [torch.zeros(_HIGH_BUCKETS, dtype=torch.int64) for _ in range(models)]
    for counts in mapped(reader, PASS_SLICE, _high_counts):
        for histogram, count in zip(high, counts):
            histogram += count
    buckets = [bucket_at_rank(histogram, keep) for histogram in high]
    low = [torch.zeros(_LOW_BUCKETS + 2, dtype=torch.int64) for _ in range(models)]
    for counts in mapped(reader, PASS_SLICE, lambda parts: _low_counts(parts, buckets)):
        for histogram, count in zip(low, counts):
            histogram += count
    return [_as_float((bucket << 16) | bucket_at_rank(histogram[1:-1], rank)[0])
            for histogram, (bucket, rank) in zip(low, buckets)]


def _high_counts(parts: list[Tensor]) -> list[Tensor]:
    """Per task vector of a slice: its entries counted by the top 16 bits of |M − A|."""
    base, *inputs = parts
    return [torch.bincount(magnitude_bits(model, base) >> 16, minlength=_HIGH_BUCKETS) for model in inputs]


def _low_counts(parts: list[Tensor], buckets: list[tuple[int, int]]) -> list[Tensor]:
    """Per task vector of a slice: the entries inside its threshold's bucket counted by
    their low 16 bits; those below the bucket in bin 0, above it in the last bin (no mask,
    no gather, whatever the bucket holds)."""
    base, *inputs = parts
    return [torch.bincount((magnitude_bits(model, base) - (bucket << 16)).clamp_(-1, _LOW_BUCKETS).add_(1),
                           minlength=_LOW_BUCKETS + 2)
            for model, (bucket, _) in zip(inputs, buckets)]


def _byte_pair_thresholds(reader: SliceReader, keep: int) -> list[float | None]:
    """`top_fraction_thresholds` of float8 inputs in one pass that decodes nothing: an
    entry of |M − A| is one of the 65 536 values a (byte of M, byte of A) pair makes, so
    counting the pairs counts the values; the keep-th largest is then read off the
    pairs' magnitudes (made with the slices' own float32 arithmetic) in descending order."""
    base_dtype, *model_dtypes = (part.dtype for part in reader.stored(0, 0))  # type: ignore[misc]
    counts = [torch.zeros(1 << 16, dtype=torch.int64) for _ in model_dtypes]
    for slice_counts in mapped(reader, PASS_SLICE, _pair_counts, stored=True):
        for total, count in zip(counts, slice_counts):
            total += count
    return [_kth_largest(_pair_magnitude_bits(dtype, base_dtype), count, keep)
            for dtype, count in zip(model_dtypes, counts)]


def _pair_counts(parts: list[Tensor]) -> list[Tensor]:
    """Per model of a float8 slice: its entries counted by (byte of M) · 256 + byte of A."""
    base = parts[0].view(torch.uint8).to(torch.int32)
    return [torch.bincount((model.view(torch.uint8).to(torch.int32) << 8).bitwise_or_(base), minlength=1 << 16)
            for model in parts[1:]]


def _pair_magnitude_bits(model_dtype: torch.dtype, base_dtype: torch.dtype) -> Tensor:
    """`magnitude_bits` of every (M byte, A byte) pair, indexed as `_pair_counts` counts."""
    patterns = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    models = to_float32(patterns.view(model_dtype)).repeat_interleave(256)
    bases = to_float32(patterns.view(base_dtype)).repeat(256)
    return magnitude_bits(models, bases)


def _kth_largest(bits: Tensor, counts: Tensor, keep: int) -> float:
    """The keep-th largest of values given as bit patterns with their counts."""
    order = torch.argsort(bits, descending=True, stable=True)
    reached = counts[order].cumsum(0)
    return _as_float(int(bits[order[int(torch.searchsorted(reached, keep))]]))


def mapped(reader: SliceReader, size: int, function: Callable[..., T],
           along: Callable[[int], Any] | None = None, stored: bool = False) -> Iterator[T]:
    """`function(parts)` of each slice of one pass (`function(parts, along(slice size))`
    when `along` is given; `along` runs on the calling thread, in slice order), in order;
    `stored`: the parts as stored rather than widened. Slices are made on the slice pool
    where the reader may be read from several threads."""
    starts = range(0, reader.count, size)
    read = reader.stored if stored else reader.read
    assert read is not None

    def item(start: int) -> tuple[int, Any]:
        return start, along(min(size, reader.count - start)) if along is not None else None

    def made(job: tuple[int, Any]) -> T:
        start, extra = job
        parts = read(start, min(size, reader.count - start))
        return function(parts) if along is None else function(parts, extra)

    jobs = map(item, starts)
    return in_parallel(made, jobs) if reader.random_access and DEFAULT_WORKERS > 1 else map(made, jobs)


def _as_float(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))
