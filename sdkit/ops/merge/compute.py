"""Computing one output tensor from its KeyAction: read, upcast, merge, cast, check.

Math runs in float32 and the result is cast once to the output dtype. Elementwise
methods run over fixed slices of each tensor, and the others (TIES, DARE, SLERP) through
their streamed forms, a slice at a time in as many passes as they need, so the float32
working set is a few megabytes whatever the tensor size; slices are fixed by the tensor
alone, so the result is the same bytes however it is scheduled. A large tensor of
stored inputs is read a slice at a time and written as it is made (never whole in
memory); a smaller one is merged from its mapped inputs into one output tensor. Every
output tensor is checked for NaN/Inf.

An input may be an earlier step of a merge in steps (`AlignedInput.slices`): its key is
then read as float32 slices of its output, made as they are read (`output_reader`),
cast to that step's dtype on the way, the values its written file would hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from threading import Lock
from typing import Any

import torch

from sdkit.errors import SdkitError
from sdkit.io.dtypes import CODE_TO_TORCH
from sdkit.io.float8 import to_float32
from sdkit.io.lazy import PIECEWISE_BYTES
from sdkit.ops.merge.plan import AlignedInput, KeyAction
from sdkit.ops.merge.registry import BLEND_PARAM, MergeMethod
from sdkit.ops.merge.streamed import (
    SliceReader,
    joined_reader,
    stream_reader,
    tensor_reader,
)

SLICE_ELEMENTS = 1 << 18  # 256 Ki elements: 1 MiB per float32 operand
# slices in a piece the writer may make on a worker thread (whole slices, so the slices
# are the same however a key is made)
PIECE_SLICES = 4


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

    def pieces(self, action: KeyAction) -> Callable[[], Iterator[Any]] | None:
        """For a large merge by a method that runs in slices, or a large copy of an earlier
        step's output: the output produced slice by slice from slices of the inputs
        (memory: a few slices, whatever the tensor size), as `LazyTensor.chunks` yields
        it; None where the key is computed in memory."""
        if action.nbytes < PIECEWISE_BYTES:
            return None
        if not action.merged:
            return partial(self._copy_pieces, action) if self._copies_in_slices(action) else None
        if not (self._in_slices and action.channels is None):
            return None
        models = [self.inputs[i] for i in action.sources]
        if not any(model.slices for model in models) and \
                any(model.span(action.key) is None and model.elements(action.key) is None for model in models):
            return None
        return partial(self._merge_pieces, action, deferred=True)

    def output_reader(self, action: KeyAction) -> SliceReader:
        """The key's output as the float32 slices a later step reads: made slice by slice
        and cast to the output dtype on the way, where the method allows; else made whole."""
        if action.merged and self._in_slices and action.channels is None:
            pieces = partial(self._merge_pieces, action)
        elif self._copies_in_slices(action):
            pieces = partial(self._copy_pieces, action)
        else:
            return tensor_reader([self(action)])
        return stream_reader(math.prod(action.shape), lambda: map(to_float32, pieces()))

    @property
    def _in_slices(self) -> bool:
        return self.method.elementwise or self.method.streamed is not None

    def _copies_in_slices(self, action: KeyAction) -> bool:
        """A float copy of an earlier step's output (a stored tensor is mapped instead)."""
        return (not action.merged and self.inputs[action.sources[0]].slices is not None
                and CODE_TO_TORCH[action.dtype].is_floating_point)

    def _input_reader(self, action: KeyAction, *, from_spans: bool) -> SliceReader:
        """The inputs of a merged key, one after the other: an earlier step's output made
        slice by slice, a stored tensor read from its file bytes or a GGUF one from its
        blocks (`from_spans`, only the slice in memory), or mapped."""
        readers = []
        for index in action.sources:
            model = self.inputs[index]
            span = model.span(action.key) if from_spans and model.slices is None else None
            elements = model.elements(action.key) if from_spans and model.slices is None else None
            if model.slices is not None and self._reads_once(model, action.key):
                readers.append(model.slices(action.key))
            elif span is not None:
                dtype = CODE_TO_TORCH[model.infos[action.key].dtype]
                readers.append(_span_reader([span], [dtype], math.prod(action.shape)))
            elif elements is not None:  # a GGUF quantized key: only the slice's blocks
                readers.append(SliceReader(math.prod(action.shape), 1,
                                           lambda start, size, read=elements: [read(start, size)]))
            else:
                readers.append(tensor_reader([model.load(action.key)]))
        return joined_reader(readers)

    def _reads_once(self, model: AlignedInput, key: str) -> bool:
        """Whether an earlier step's output is read as it is made. A method that reads
        its inputs in several passes (TIES, DARE, SLERP) would make it again for each
        pass, and for each pass of every step after it: below the size at which a key is
        made in pieces, the output is made once, whole (in its dtype), and read from it."""
        return self.method.elementwise or model.infos[key].nbytes >= PIECEWISE_BYTES

    def _merge_pieces(self, action: KeyAction, deferred: bool = False) -> Iterator[Any]:
        """The merged key in its output dtype, piece after piece. `deferred`: where the
        method is elementwise and the inputs can be read anywhere, each piece is yielded as
        a function that makes it, independent of the others (the writer makes several at
        once on its worker threads)."""
        reader = self._input_reader(action, from_spans=True)
        params = self._params(action)
        if deferred and self.method.elementwise and reader.random_access:
            size = PIECE_SLICES * SLICE_ELEMENTS
            for start in range(0, reader.count, size):
                yield partial(self._merged_piece, action, reader, params, start, min(size, reader.count - start))
            return
        yield from self._cast_pieces(action, self._output_slices(action.key, reader, params))

    def _merged_piece(self, action: KeyAction, reader: SliceReader, params: dict[str, Any],
                      start: int, size: int) -> torch.Tensor:
        """Elements [start, start + size) of an elementwise merge, in the output dtype."""
        piece = SliceReader(size, reader.inputs, lambda at, count: reader.read(start + at, count))
        return torch.cat(list(self._cast_pieces(action, self._output_slices(action.key, piece, params))))

    def _copy_pieces(self, action: KeyAction) -> Iterator[torch.Tensor]:
        source = self.inputs[action.sources[0]].slices(action.key)
        yield from self._cast_pieces(action, (values for _, (values,) in source.slices(SLICE_ELEMENTS)))

    def _cast_pieces(self, action: KeyAction, slices: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Float32 slices cast to the output dtype, each checked for NaN/Inf."""
        dtype = CODE_TO_TORCH[action.dtype]
        for values in slices:
            piece = values.to(dtype)
            if _may_not_fit(values, dtype):
                self._count_non_finite(action.key, piece)
            yield piece

    def _params(self, action: KeyAction) -> dict[str, Any]:
        params = dict(self.params)
        if action.alpha is not None:
            params[BLEND_PARAM] = action.alpha
        return params

    def _output_slices(self, key: str, reader: SliceReader, params: dict[str, Any]) -> Iterator[torch.Tensor]:
        """The merged tensor, flattened, slice after slice, in float32."""
        if self.method.elementwise:
            for _, parts in reader.slices(SLICE_ELEMENTS):
                yield self._run(key, parts, params)
            return
        produced = 0
        for piece in self.method.stream(reader, params, key):
            produced += piece.numel()
            yield piece.reshape(-1)
        if produced != reader.count:
            raise SdkitError(f"{key}: merge method {self.method.name} produced {produced} values "
                             f"for a tensor of {reader.count}")

    def _copy(self, action: KeyAction) -> torch.Tensor:
        tensor = self.inputs[action.sources[0]].load(action.key)
        dtype = CODE_TO_TORCH[action.dtype]
        if tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        if tensor.is_floating_point() and _suspicious(tensor):
            self._count_non_finite(action.key, tensor)
        return tensor

    def _merge(self, action: KeyAction) -> torch.Tensor:
        params = self._params(action)
        dtype = CODE_TO_TORCH[action.dtype]
        if action.channels is None and self._in_slices:
            result, flagged = self._merge_in_slices(action, params, dtype)
            if flagged:
                self._count_non_finite(action.key, result)
            return result
        tensors = [self.inputs[i].load(action.key) for i in action.sources]
        if action.channels is not None:
            values = self._merge_channels(action, tensors, params)
            result, flagged = values.to(dtype), _may_not_fit(values, dtype)
        else:
            values = self._run(action.key, [to_float32(t) for t in tensors], params)
            result, flagged = values.to(dtype), _may_not_fit(values, dtype)
        if flagged:
            self._count_non_finite(action.key, result)
        return result

    def _merge_in_slices(self, action: KeyAction, params: dict[str, Any],
                         dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        """Slice by slice: the float32 operands stay in cache and are never whole-tensor
        sized (what makes the merge run at memory speed). Returns the output and whether
        it may hold NaN/Inf."""
        out = torch.empty(action.shape, dtype=dtype)
        out_flat = out.view(-1)
        start, flagged = 0, False
        reader = self._input_reader(action, from_spans=False)
        for values in self._output_slices(action.key, reader, params):
            out_flat[start:start + values.numel()] = values
            start += values.numel()
            flagged = flagged or _may_not_fit(values, dtype)
        return out, flagged

    def _merge_channels(self, action: KeyAction, tensors: list[torch.Tensor],
                        params: dict[str, Any]) -> torch.Tensor:
        """Inpainting A: merge the input channels the others have, keep A's extra ones."""
        base = tensors[0].to(torch.float32, copy=True)
        shared = [base[:, : action.channels]] + [to_float32(t) for t in tensors[1:]]
        base[:, : action.channels] = self._run(action.key, shared, params)
        return base

    def _run(self, key: str, tensors: list[torch.Tensor], params: dict[str, Any]) -> torch.Tensor:
        result = self.method(tensors, params, key)
        if result.shape != tensors[0].shape:
            raise SdkitError(f"{key}: merge method {self.method.name} returned shape "
                             f"{list(result.shape)} for inputs of shape {list(tensors[0].shape)}")
        return result

    def _count_non_finite(self, key: str, tensor: torch.Tensor) -> None:
        bad = _non_finite(tensor)
        if not bad:
            return
        if not self.allow_nan:
            raise SdkitError(f"{self.output}: merged tensor {key} has {bad} NaN/Inf values; "
                             "nothing written (--allow-nan keeps them)")
        self.non_finite.add(key, bad)


def _span_reader(spans: list[Any], dtypes: list[torch.dtype], count: int) -> SliceReader:
    """Slices read (not mapped) from the inputs' stored bytes: only the slice in memory."""
    from sdkit.io.byte_span import read_elements

    def stored(start: int, size: int) -> list[torch.Tensor]:
        return [read_elements(span, dtype, start, size) for span, dtype in zip(spans, dtypes)]

    return SliceReader(count, len(spans), lambda start, size: list(map(to_float32, stored(start, size))),
                       stored=stored)


def _may_not_fit(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when float32 `values` cast to `dtype` may hold NaN/Inf: a NaN, or a value
    beyond the dtype's largest. Checked before the cast, where min/max runs vectorized
    (on float8 it has no kernel at all); the exact count then looks at the cast values."""
    if values.numel() == 0:
        return False
    low, high = torch.aminmax(values)
    limit = torch.finfo(dtype).max
    return not (float(low) >= -limit and float(high) <= limit)


def _non_finite(tensor: torch.Tensor) -> int:
    """How many NaN/Inf the tensor holds (float8, which has no `isfinite`, widened a slice
    at a time)."""
    if tensor.element_size() != 1:
        return tensor.numel() - int(torch.isfinite(tensor).sum())
    flat = tensor.reshape(-1)
    return sum(_non_finite(to_float32(flat[start:start + SLICE_ELEMENTS]))
               for start in range(0, flat.numel(), SLICE_ELEMENTS))


def _suspicious(tensor: torch.Tensor) -> bool:
    """True when the tensor may hold NaN/Inf. One min/max pass (NaN propagates through
    it), many times faster than `isfinite`, which only runs when this says so."""
    if tensor.numel() == 0:
        return False
    if tensor.element_size() == 1:  # float8: no min/max kernel; widened a slice at a time
        flat = tensor.reshape(-1)
        return any(_suspicious(to_float32(flat[start:start + SLICE_ELEMENTS]))
                   for start in range(0, flat.numel(), SLICE_ELEMENTS))
    low, high = torch.aminmax(tensor)
    limit = torch.finfo(tensor.dtype).max
    return not (float(low) >= -limit and float(high) <= limit)
