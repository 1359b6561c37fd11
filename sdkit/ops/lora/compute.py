"""The arithmetic of a bake: `W' = W + Σ strength · ΔW` for one base key at a time.

Every delta is `lora_math.delta_weight` at strength 1 (a plain LoRA module's `scale ·
up @ down` is formed here with the same operations, to skip a pass, and a few MiB of
rows at a time: the float32 product of an SDXL feed-forward layer alone is 52 MiB,
per worker), times the strength,
added in float32 to the original weight, then narrowed to the output dtype. Anything
that applies the same deltas in the same order (the sampler's runtime LoRAs) gets the
same bits. The elementwise part runs in blocks of rows small enough to stay in the CPU
cache (it gives the same bits as the whole tensor at once): each block of the base is
widened, gets every delta added, is checked against the output dtype's range and is
written narrowed into the output, so the weight crosses memory once instead of once
per step. Deltas that depend on the weight (IA3, GLoRA, OFT, DoRA) see the original
weight of the layer the module was made for (a layer spread over several tensors is put
back together from their originals, in the module's row order); OFT's strength acts
inside its rotation. Values beyond the output dtype's range
are clamped to it (and counted). A contribution covers the rows of its layer's delta that
its `Piece` names (all of them but where one adapter layer spans several base tensors, or
meets its tensor in the other half order); a plain LoRA's rows are `up[rows] @ down`.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Iterator, Sequence

from sdkit.adapters.lora_format import BOFT, LORA, OFT, LoraModule
from sdkit.adapters.lora_math import PRODUCT_ELEMENTS, delta_weight, lora_product_chunks, needs_base_weight
from sdkit.io import LazyTensor
from sdkit.io.model_file import tensor_nbytes
from sdkit.ops.lora.plan import Contribution

if TYPE_CHECKING:
    import torch

_BLOCK_ELEMENTS = 1 << 17  # float32 elements per row block (512 KiB)


def is_plain_lora(module: LoraModule) -> bool:
    return module.type == LORA and "mid" not in module.tensors and module.dora_scale is None


class KeyBaker:
    """Computes baked base keys; `clamped` lists keys whose values were clamped."""

    def __init__(self, sources: dict[str, LazyTensor], weights: dict[str, list[Contribution]],
                 biases: dict[str, list[Contribution]], codes: dict[str, str]) -> None:
        self.sources = sources
        self.weights = weights
        self.biases = biases
        self.codes = codes  # output dtype code of every touched key
        self.clamped: list[str] = []
        self._lock = threading.Lock()
        self._spread: dict[tuple[int, int, float], _SpreadDelta] = {}  # by module, layer and strength

    def cost(self, name: str) -> int:
        """Bytes a key holds at its peak: its output, and the float32 deltas (and copy of
        the base weight) that exist together while it is computed."""
        shape = self.sources[name].shape
        elements = math.prod(shape)
        columns = elements // shape[0] if shape and shape[0] else 0
        weights = self.weights.get(name, [])
        held = sum(_held_elements(c, columns) for c in weights)
        if any(needs_base_weight(c.module) for c in weights):
            held += elements
        held += sum(math.prod(c.target.shape) for c in weights if c.target.pieces and needs_base_weight(c.module))
        return tensor_nbytes(self.codes[name], shape) + 4 * held

    def compute(self, name: str) -> "torch.Tensor":
        import torch

        from sdkit.io.dtypes import CODE_TO_TORCH

        lazy = self.sources[name]
        source = lazy.load()
        weights, biases = self.weights.get(name, []), self.biases.get(name, [])
        original = None
        if any(needs_base_weight(c.module) for c in weights):
            original = source.to(torch.float32)
        deltas = [self._spread_delta(c) if c.target.pieces and not is_plain_lora(c.module) else _delta(c, original)
                  for c in weights]
        deltas += [_bias(c) for c in biases]
        dtype = CODE_TO_TORCH[self.codes[name]]
        # a float32 source made for this bake (a scaled fp8 weight) takes its deltas in place
        in_place = lazy.fresh and original is None and source.dtype == dtype == torch.float32
        return self._blocked(name, source, deltas, dtype, in_place)

    def _spread_delta(self, contribution: Contribution) -> "_Delta":
        """The contribution's rows of a delta spread over pieces (several tensors, or two
        halves of one): the whole layer's delta is computed once, kept until every piece
        has taken its rows."""
        key = (id(contribution.module), id(contribution.target), contribution.strength)
        with self._lock:
            entry = self._spread.setdefault(key, _SpreadDelta(len(contribution.target.pieces)))
        with entry.lock:  # a worker on another piece waits for the delta rather than redo it
            if entry.delta is None:
                entry.delta = _layer_delta(contribution, self._layer_weight(contribution))
            delta = entry.delta
        with self._lock:
            entry.left -= 1
            if entry.left <= 0:
                self._spread.pop(key, None)
        return _Delta(_whole(_piece_rows(delta, contribution)), contribution.piece.weight.rows, None)

    def _layer_weight(self, contribution: Contribution) -> "torch.Tensor | None":
        """The original weight of a layer whose delta is spread over pieces (q, k and v
        kept apart, halves stored in the other order), put together in the adapter's
        row order: a delta that depends on the weight (DoRA's norm, OFT's rotations)
        is computed on the whole layer, then cut."""
        import torch

        target = contribution.target
        if not needs_base_weight(contribution.module):
            return None
        whole = torch.empty(target.shape[0], math.prod(target.shape[1:]), dtype=torch.float32)
        for piece in target.pieces:
            values = self.sources[piece.weight.key].load()
            rows = piece.weight.rows
            values = values if rows is None else values[rows[0]:rows[1]]
            whole[piece.delta_rows[0]:piece.delta_rows[1]] = values.reshape(piece.rows, -1)
        return whole.reshape(target.shape)

    def _note_clamp(self, name: str) -> None:
        with self._lock:
            if name not in self.clamped:
                self.clamped.append(name)

    def _narrow(self, name: str, values: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
        """`values` (float32, changed in place) made fit for `dtype`."""
        import torch

        if dtype.is_floating_point and dtype.itemsize < 4:
            limit = torch.finfo(dtype).max
            low, high = torch.aminmax(values)
            if float(high) > limit or float(low) < -limit:
                values.clamp_(-limit, limit)
                self._note_clamp(name)
        return values

    def _blocked(self, name: str, source: "torch.Tensor", deltas: Sequence["_Delta"],
                 dtype: "torch.dtype", in_place: bool = False) -> "torch.Tensor":
        import torch

        out = source if in_place else torch.empty(source.shape, dtype=dtype)
        flat_source = source.reshape(source.shape[0], -1)
        flat_out = out.view(flat_source.shape)
        rows = flat_source.shape[0]
        step = max(1, _BLOCK_ELEMENTS // max(1, flat_source.shape[1]))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            block = flat_source[start:stop] if in_place else flat_source[start:stop].to(torch.float32, copy=True)
            for delta in deltas:
                first, last = delta.rows or (0, rows)
                for low, part in delta.pieces(max(start, first) - first, min(stop, last) - first):
                    at = first + low - start
                    block[at:at + part.shape[0]].add_(part)
            narrowed = self._narrow(name, block, dtype)
            if not in_place:
                flat_out[start:stop].copy_(narrowed)
        return out


class _SpreadDelta:
    """The delta of a layer spread over pieces, made by the first piece's worker and kept
    until `left` more pieces have taken their rows."""

    def __init__(self, pieces: int) -> None:
        self.lock = threading.Lock()
        self.delta: "torch.Tensor | None" = None
        self.left = pieces


class _Delta:
    """A delta over rows `rows` of a key (all rows: None), as a (rows, columns) matrix made
    in chunks of rows, in order (`chunks` yields each chunk's first row and the chunk),
    times `strength` (None: already applied)."""

    def __init__(self, chunks: Iterator[tuple[int, "torch.Tensor"]], rows: tuple[int, int] | None,
                 strength: float | None) -> None:
        self.rows = rows
        self.strength = strength
        self._chunks = chunks
        self._first, self._chunk = 0, None

    def pieces(self, low: int, high: int) -> Iterator[tuple[int, "torch.Tensor"]]:
        """Rows [low, high) of the delta, strength applied, as (first row, rows) pieces;
        asked for in increasing order of rows."""
        while low < high:
            chunk = self._chunk_at(low)
            end = min(high, self._first + chunk.shape[0])
            part = chunk[low - self._first:end - self._first]
            # a strength of 1 leaves the values as they are: no pass over them
            yield low, (part if self.strength in (None, 1.0) else part.mul_(self.strength))
            low = end

    def _chunk_at(self, row: int) -> "torch.Tensor":
        while self._chunk is None or row >= self._first + self._chunk.shape[0]:
            self._first, self._chunk = next(self._chunks)
        return self._chunk


def _whole(values: "torch.Tensor") -> Iterator[tuple[int, "torch.Tensor"]]:
    yield 0, values


def _delta(contribution: Contribution, original: "torch.Tensor | None") -> _Delta:
    """The contribution's rows of its module's delta, placed on its piece's base rows."""
    module, piece = contribution.module, contribution.piece
    rows, (first, last) = piece.weight.rows, piece.delta_rows
    whole = (first, last) == (0, contribution.target.shape[0])
    if is_plain_lora(module):
        # lora_math's `scale * up @ down`, the same operations (so the same bits), a chunk
        # of rows at a time: a layer-sized float32 product is never held; a piece's rows
        # of the product are `up[rows] @ down`
        up = module.tensors["up"].load().float().flatten(1)
        down = module.tensors["down"].load().float().flatten(1)
        up = up if whole else up[first:last]
        chunks = ((start, chunk.mul_(module.scale)) for start, chunk in lora_product_chunks(up, down))
        return _Delta(chunks, rows, contribution.strength)
    context = None
    if needs_base_weight(module) and original is not None:  # this tensor, or the layer's rows of it
        context = original if rows is None else original[rows[0]:rows[1]]
    return _Delta(_whole(_piece_rows(_layer_delta(contribution, context), contribution)), rows, None)


def _layer_delta(contribution: Contribution, context: "torch.Tensor | None") -> "torch.Tensor":
    """A (non-plain) module's whole delta at the contribution's strength; `context`: the
    layer's original weight, for the types whose delta depends on it."""
    module, strength = contribution.module, contribution.strength
    if module.type in (OFT, BOFT):  # the strength blends each rotation with the identity
        return delta_weight(module, context, strength)[0]
    delta, _ = delta_weight(module, context, 1.0)
    return delta if strength == 1.0 else delta.mul_(strength)


def _piece_rows(delta: "torch.Tensor", contribution: Contribution) -> "torch.Tensor":
    first, last = contribution.piece.delta_rows
    return delta.reshape(contribution.target.shape[0], -1)[first:last]


def _held_elements(contribution: Contribution, columns: int) -> int:
    """Float32 elements of a contribution's delta held at once (a plain LoRA's: a chunk)."""
    elements = contribution.piece.rows * columns
    if is_plain_lora(contribution.module):
        return min(elements, PRODUCT_ELEMENTS + columns)
    return elements if not contribution.target.pieces else contribution.target.shape[0] * columns


def _bias(contribution: Contribution) -> _Delta:
    import torch

    first, last = contribution.piece.delta_rows
    bias = contribution.module.tensors["bias"].load().to(torch.float32).reshape(-1, 1)
    return _Delta(_whole(bias[first:last]), contribution.piece.bias.rows, contribution.strength)
