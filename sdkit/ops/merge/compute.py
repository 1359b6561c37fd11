"""Computing one output tensor from its KeyAction: read, upcast, merge, cast, check.

Math runs in float32 and the result is cast once to the output dtype. Elementwise
methods run over fixed slices of each tensor, so the float32 working set is a few
megabytes whatever the tensor size; slices are fixed by the tensor alone, so the result
is the same bytes however it is scheduled. Every output tensor is checked for NaN/Inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from threading import Lock
from typing import Any, Callable, Iterator, Sequence

import torch

from sdkit.errors import SdkitError
from sdkit.io.dtypes import CODE_TO_TORCH
from sdkit.io.lazy import PIECEWISE_BYTES
from sdkit.ops.merge.plan import AlignedInput, KeyAction
from sdkit.ops.merge.registry import BLEND_PARAM, MergeMethod

SLICE_ELEMENTS = 1 << 18  # 256 Ki elements: 1 MiB per float32 operand


@dataclass
class NonFiniteLog:
    """Keys whose output holds NaN/Inf, when the merge is told to keep going."""

    counts: dict[str, int] = field(default_factory=dict)
    lock: Lock = field(default_factory=Lock, repr=False)

    def add(self, key: str, count: int) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + count


@dataclass
class KeyComputer:
    """Makes output tensors for a plan's actions (safe to call from several threads)."""

    inputs: Sequence[AlignedInput]
    method: MergeMethod
    params: dict[str, Any]
    output: str
    allow_nan: bool = False
    non_finite: NonFiniteLog = field(default_factory=NonFiniteLog)

    def __call__(self, action: KeyAction) -> torch.Tensor:
        return self._merge(action) if action.merged else self._copy(action)

    def pieces(self, action: KeyAction) -> Callable[[], Iterator[torch.Tensor]] | None:
        """For a large elementwise merge of stored inputs: the output produced slice by
        slice from slices read from the inputs (memory: a few slices, whatever the tensor
        size); None where the key is computed whole."""
        if not (action.merged and self.method.elementwise and action.channels is None
                and action.nbytes >= PIECEWISE_BYTES):
            return None
        spans = [self.inputs[i].span(action.key) for i in action.sources]
        if any(span is None for span in spans):
            return None
        return partial(self._merge_pieces, action, spans)

    def _merge_pieces(self, action: KeyAction, spans: list[Any]) -> Iterator[torch.Tensor]:
        from sdkit.io.byte_span import read_elements

        params = dict(self.params)
        if action.alpha is not None:
            params[BLEND_PARAM] = action.alpha
        dtypes = [CODE_TO_TORCH[self.inputs[i].infos[action.key].dtype] for i in action.sources]
        dtype = CODE_TO_TORCH[action.dtype]
        count = math.prod(action.shape)
        for start in range(0, count, SLICE_ELEMENTS):
            size = min(SLICE_ELEMENTS, count - start)
            parts = [read_elements(span, source, start, size).to(torch.float32) for span, source in zip(spans, dtypes)]
            piece = self._run(action.key, parts, params).to(dtype)
            if _suspicious(piece):
                self._count_non_finite(action.key, piece)
            yield piece

    def _copy(self, action: KeyAction) -> torch.Tensor:
        tensor = self.inputs[action.sources[0]].load(action.key)
        dtype = CODE_TO_TORCH[action.dtype]
        if tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        if tensor.is_floating_point() and _suspicious(tensor):
            self._count_non_finite(action.key, tensor)
        return tensor

    def _merge(self, action: KeyAction) -> torch.Tensor:
        params = dict(self.params)
        if action.alpha is not None:
            params[BLEND_PARAM] = action.alpha
        tensors = [self.inputs[i].load(action.key) for i in action.sources]
        dtype = CODE_TO_TORCH[action.dtype]
        if action.channels is not None:
            result = self._merge_channels(action, tensors, params).to(dtype)
        elif self.method.elementwise:
            result = self._merge_in_slices(action, tensors, params, dtype)
        else:
            result = self._run(action.key, [t.to(torch.float32) for t in tensors], params).to(dtype)
        if _suspicious(result):
            self._count_non_finite(action.key, result)
        return result

    def _merge_in_slices(self, action: KeyAction, tensors: list[torch.Tensor],
                         params: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        """Slice by slice: the float32 operands stay in cache and are never whole-tensor
        sized (what makes the merge run at memory speed)."""
        flat = [t.reshape(-1) for t in tensors]
        out = torch.empty(action.shape, dtype=dtype)
        out_flat = out.view(-1)
        for start in range(0, out_flat.numel(), SLICE_ELEMENTS):
            stop = start + SLICE_ELEMENTS
            out_flat[start:stop] = self._run(action.key, [f[start:stop].to(torch.float32) for f in flat], params)
        return out

    def _merge_channels(self, action: KeyAction, tensors: list[torch.Tensor],
                        params: dict[str, Any]) -> torch.Tensor:
        """Inpainting A: merge the input channels the others have, keep A's extra ones."""
        base = tensors[0].to(torch.float32, copy=True)
        shared = [base[:, : action.channels]] + [t.to(torch.float32) for t in tensors[1:]]
        base[:, : action.channels] = self._run(action.key, shared, params)
        return base

    def _run(self, key: str, tensors: list[torch.Tensor], params: dict[str, Any]) -> torch.Tensor:
        result = self.method(tensors, params, key)
        if result.shape != tensors[0].shape:
            raise SdkitError(f"{key}: merge method {self.method.name} returned shape "
                             f"{list(result.shape)} for inputs of shape {list(tensors[0].shape)}")
        return result

    def _count_non_finite(self, key: str, tensor: torch.Tensor) -> None:
        bad = tensor.numel() - int(torch.isfinite(tensor).sum())
        if not bad:
            return
        if not self.allow_nan:
            raise SdkitError(f"{self.output}: merged tensor {key} has {bad} NaN/Inf values; "
                             "nothing written (--allow-nan keeps them)")
        self.non_finite.add(key, bad)


def _suspicious(tensor: torch.Tensor) -> bool:
    """True when the tensor may hold NaN/Inf. One min/max pass (NaN propagates through
    it), many times faster than `isfinite`, which only runs when this says so."""
    if tensor.numel() == 0:
        return False
    if tensor.element_size() == 1:  # float8: no min/max kernel, widen first
        tensor = tensor.to(torch.float16)
    low, high = torch.aminmax(tensor)
    limit = torch.finfo(tensor.dtype).max
    return not (float(low) >= -limit and float(high) <= limit)
