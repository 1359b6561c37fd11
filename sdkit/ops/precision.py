"""Precision changes: float tensors cast to one dtype, tensor by tensor, overflow watched.

- Only float tensors are cast; integer and bool tensors (position ids, step counters) are
  never touched.
- `keep` patterns name tensors that stay in the dtype they are stored in (e.g. a VAE kept
  in fp32 while the UNet goes to fp16). A pattern is a glob (`first_stage_model.*`), or a
  regular expression when written `re:...`; it is tried on the output name and on every
  input name the tensor is made from, so LDM patterns work on diffusers outputs too.
- Values beyond the target's range (fp32 weights over 65504 going to fp16) would become
  inf. Every cast tensor is checked (one min/max pass); by default the first such
  tensor stops the write, and the caller scans for the full report. `clamp` clamps to the
  target's largest finite value, `allow-inf` keeps the infinities; both are reported.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

from sdkit.errors import SdkitError
from sdkit.io import LazyTensor
from sdkit.io.lazy import PIECEWISE_BYTES
from sdkit.io.model_file import FLOAT_DTYPES

if TYPE_CHECKING:
    import torch

OVERFLOW_POLICIES = ("refuse", "clamp", "allow-inf")


@dataclass
class OverflowReport:
    """Tensors with values beyond the target dtype's range: key -> (count, max |value|)."""

    target: str
    tensors: dict[str, tuple[int, float]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(count for count, _ in self.tensors.values())

    @property
    def worst(self) -> tuple[str, float] | None:
        if not self.tensors:
            return None
        key = max(self.tensors, key=lambda name: self.tensors[name][1])
        return key, self.tensors[key][1]

    def summary(self) -> str:
        worst = self.worst
        if worst is None:
            return f"no values beyond the {self.target} range"
        return (f"{self.count} values in {len(self.tensors)} tensors are beyond the {self.target} "
                f"range (worst {worst[0]}, max |value| {worst[1]:.6g})")

    def to_json(self) -> dict[str, object]:
        worst = self.worst
        return {"count": self.count, "tensors": {k: {"count": c, "max_abs": m}
                                                 for k, (c, m) in sorted(self.tensors.items())},
                "worst_key": worst[0] if worst else None, "max_abs": worst[1] if worst else None}


@dataclass
class PrecisionReport:
    """What a precision change did: tensors cast, kept by pattern, and overflows."""

    target: str  # dtype code
    policy: str
    cast: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    overflow: OverflowReport = field(default_factory=lambda: OverflowReport(""))

    def to_json(self) -> dict[str, object]:
        return {"dtype": self.target, "overflow_policy": self.policy, "cast": len(self.cast),
                "kept": self.kept, "overflow": self.overflow.to_json()}


class OverflowStop(Exception):
    """Raised from inside a tensor load to stop the write at the first overflow."""


def key_matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """A predicate over key names for glob patterns and `re:` regular expressions."""
    compiled: list[Callable[[str], bool]] = []
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                regex = re.compile(pattern[3:])
            except re.error as exc:
                raise SdkitError(f"--keep-fp32 {pattern!r}: not a regular expression ({exc})") from None
            compiled.append(lambda key, regex=regex: regex.search(key) is not None)
        else:
            compiled.append(partial(_glob_matches, pattern))
    return lambda key: any(test(key) for test in compiled)


def _glob_matches(pattern: str, key: str) -> bool:
    return fnmatch.fnmatchcase(key, pattern)


def _largest(code: str) -> float:
    import torch

    from sdkit.io.dtypes import CODE_TO_TORCH

    return float(torch.finfo(CODE_TO_TORCH[code]).max)


def can_overflow(source: str, target: str) -> bool:
    """Whether values of a `source` float tensor may lie beyond `target`'s range."""
    return _largest(target) < _largest(source)


def overflow_of(tensor: "torch.Tensor", limit: float) -> tuple[int, float] | None:
    """(count, max |value|) of the values beyond ±limit, None when there are none."""
    import torch

    if tensor.numel() == 0:
        return None
    low, high = torch.aminmax(tensor)
    worst = max(abs(float(low)), abs(float(high)))
    if not worst > limit:  # also False for NaN
        return None
    count = int((tensor.abs() > limit).sum())
    return count, worst


def _cast_load(name: str, lazy: LazyTensor, target: str, policy: str,
               report: PrecisionReport) -> "torch.Tensor":
    from sdkit.io.dtypes import CODE_TO_TORCH

    checked, _ = _check_overflow(name, lazy.load(), lazy.dtype, target, policy, report, (0, 0.0))
    return cast_tensor(checked, CODE_TO_TORCH[target])


def _cast_pieces(name: str, lazy: LazyTensor, target: str, policy: str,
                 report: PrecisionReport) -> Iterator["torch.Tensor"]:
    """The cast a piece at a time, read from the source file's bytes: a large tensor (the
    token embeddings) is never whole in memory, neither as input nor as output."""
    from sdkit.io.byte_span import read_elements
    from sdkit.io.dtypes import CODE_TO_TORCH

    span = lazy.span() if lazy.span is not None else None
    if span is None:  # nothing to read pieces from
        yield _cast_load(name, lazy, target, policy, report)
        return
    source, dtype = CODE_TO_TORCH[lazy.dtype], CODE_TO_TORCH[target]
    count, found = math.prod(lazy.shape), (0, 0.0)
    for start in range(0, count, PIECE_ELEMENTS):
        piece = read_elements(span, source, start, min(PIECE_ELEMENTS, count - start))
        piece, found = _check_overflow(name, piece, lazy.dtype, target, policy, report, found)
        yield cast_tensor(piece, dtype)


def _check_overflow(name: str, tensor: "torch.Tensor", source: str, target: str, policy: str,
                    report: PrecisionReport, earlier: tuple[int, float]) -> tuple["torch.Tensor", tuple[int, float]]:
    """`tensor` (a whole tensor or a piece of one) handled by the overflow policy, and the
    tensor's overflow so far (`earlier`: that of its previous pieces), also reported."""
    if not can_overflow(source, target):
        return tensor, earlier
    limit = _largest(target)
    found = overflow_of(tensor, limit)
    if found is None:
        return tensor, earlier
    total = (earlier[0] + found[0], max(earlier[1], found[1]))
    report.overflow.tensors[name] = total
    if policy == "refuse":
        raise OverflowStop(name)
    return (tensor.clamp(-limit, limit) if policy == "clamp" else tensor), total


PIECE_ELEMENTS = 1 << 21  # elements per piece of a cast written in pieces
_CAST_SLICE = 1 << 18  # elements per step: the float32 temporary stays in the CPU cache
_HALF_WIDTHS = ("float16", "bfloat16")


def cast_tensor(tensor: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    """`tensor.to(dtype)`, the same bytes, several times faster for fp16 ⇄ bf16.

    torch's direct half-to-half conversion runs at ~3 ns per element; widening a
    cache-sized slice to float32 (exact) and narrowing it (the same rounding the direct
    kernel applies) takes ~0.5 ns. NaN payloads are the exception (the two paths write
    different NaN bit patterns), so a slice holding NaN takes the direct path. Other
    pairs keep torch's own conversion.
    """
    import torch

    if tensor.dtype == dtype:
        return tensor
    if str(tensor.dtype).removeprefix("torch.") not in _HALF_WIDTHS or \
            str(dtype).removeprefix("torch.") not in _HALF_WIDTHS:
        return tensor.to(dtype)
    source = tensor.reshape(-1)
    out = torch.empty(tensor.shape, dtype=dtype)
    flat = out.view(-1)
    for start in range(0, source.numel(), _CAST_SLICE):
        part = source[start:start + _CAST_SLICE]
        wide = part.to(torch.float32)
        total = wide.sum()  # NaN in, NaN out (also inf - inf: then the direct path, still exact)
        flat[start:start + _CAST_SLICE] = part if bool(total != total) else wide
    return out


def cast_tensors(tensors: Mapping[str, LazyTensor], target: str, *, keep: Sequence[str] = (),
                 sources: Mapping[str, Iterable[str]] | None = None, policy: str = "refuse",
                 report: PrecisionReport | None = None) -> tuple[dict[str, LazyTensor], PrecisionReport]:
    """Float tensors lazily cast to `target` (a dtype code); the report fills as they load.

    `sources` maps output names to the input names they are made from (for `keep`).
    """
    if policy not in OVERFLOW_POLICIES:
        raise ValueError(f"policy must be one of {OVERFLOW_POLICIES}, not {policy!r}")
    report = report or PrecisionReport(target, policy)
    report.overflow = OverflowReport(target)
    kept = key_matcher(keep)
    out: dict[str, LazyTensor] = {}
    for name, lazy in tensors.items():
        names = [name, *((sources or {}).get(name, ()))]
        if lazy.dtype not in FLOAT_DTYPES or lazy.dtype == target:
            out[name] = lazy
        elif keep and any(kept(candidate) for candidate in names):
            report.kept.append(name)
            out[name] = lazy
        else:
            report.cast.append(name)
            cast = (name, lazy, target, policy, report)
            pieces = partial(_cast_pieces, *cast) if lazy.span is not None and lazy.nbytes >= PIECEWISE_BYTES else None
            out[name] = LazyTensor(target, lazy.shape, partial(_cast_load, *cast), chunks=pieces)
    return out, report


def scan_overflow(tensors: Mapping[str, LazyTensor], target: str) -> OverflowReport:
    """Every overflow the cast to `target` would meet, reading each source tensor once."""
    found = OverflowReport(target)
    limit = _largest(target)
    for name, lazy in tensors.items():
        if lazy.dtype in FLOAT_DTYPES and can_overflow(lazy.dtype, target):
            hit = overflow_of(lazy.load(), limit)
            if hit is not None:
                found.tensors[name] = hit
    return found


def overflow_error(where: str, found: OverflowReport) -> SdkitError:
    """The refusal message: count, worst key, max |value| and the two ways out."""
    return SdkitError(f"{where}: {found.summary()}; they would become inf — "
                      "use --clamp to clamp them or --allow-inf to keep inf")
