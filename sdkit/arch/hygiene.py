"""File-health facts: EMA copies, broken CLIP position ids, NaN/Inf tensors, dtypes.

Reads at most a few tiny tensors, except the NaN/Inf scan, which walks every float tensor
one at a time in fixed-size chunks so the model is never held in memory.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from typing import TYPE_CHECKING, Callable

from sdkit.arch.identity import Precision
from sdkit.io.model_file import FLOAT_DTYPES, GGUF_QUANT_PREFIX, ModelFile

if TYPE_CHECKING:
    import torch

_EMA_PREFIX = "model_ema."
_EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
_SCAN_CHUNK = 1 << 22  # elements checked per step of the NaN/Inf scan
# dtypes torch cannot sum directly: widened chunk by chunk
_NARROW_FLOATS = frozenset({"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})


def ema_tensor_names(model: ModelFile) -> list[str]:
    """LDM EMA weights (`model_ema.<dotless path>`), without the decay / step counters."""
    return [name for name in model.infos
            if name.startswith(_EMA_PREFIX) and name not in _EMA_COUNTERS]


def broken_position_ids(model: ModelFile) -> dict[str, str]:
    """CLIP `position_ids` buffers that are not the int64 0..n-1 ramp, with what is wrong.

    Merges that average every tensor turn them into floats that drift off the integers
    (arenasys toolkit `fix_clip`, ComfyUI `process_clip_state_dict`).
    """
    problems = {}
    for name, info in model.infos.items():
        if not name.endswith("position_ids"):
            continue
        values = _as_floats(model, name)
        wrong = sum(1 for index, value in enumerate(values) if value != index)
        issues = []
        if info.dtype in FLOAT_DTYPES:
            issues.append(f"stored as {info.dtype} instead of I64")
        if wrong:
            issues.append(f"{wrong} of {len(values)} values are not 0..{len(values) - 1}")
        if issues:
            problems[name] = "; ".join(issues)
    return problems


# struct codes of the safetensors dtypes a position-ids buffer comes in (little-endian)
_STRUCT_CODES = {"I64": "q", "I32": "i", "I16": "h", "I8": "b", "U8": "B",
                 "F64": "d", "F32": "f", "F16": "e"}


def _as_floats(model: ModelFile, name: str) -> list[float]:
    """A small tensor's values, flattened, as Python floats (float64: exact for these
    dtypes). Read from the file's bytes where it has them, with struct: describing a file
    needs neither torch nor numpy (numpy alone would double `sdkit inspect`'s time)."""
    from sdkit.io.byte_span import read_into

    code, span = model.infos[name].dtype, model.span(name)
    if span is None or (code not in _STRUCT_CODES and code != "BF16"):
        import torch

        return model.load(name).reshape(-1).to(torch.float64).tolist()
    raw = bytearray(span.length)
    read_into(span, 0, memoryview(raw))
    if code == "BF16":  # the upper half of a float32: put it there, zeros below
        widened = bytearray(2 * len(raw))
        widened[2::4], widened[3::4] = raw[0::2], raw[1::2]
        raw, code = widened, "F32"
    letter = _STRUCT_CODES[code]
    count = len(raw) // struct.calcsize(letter)
    return [float(value) for value in struct.unpack(f"<{count}{letter}", raw)]


def non_finite_tensors(model: ModelFile) -> list[str]:
    """Names of float tensors holding NaN or Inf; reads every float tensor in chunks."""
    bad = []
    for name, info in model.infos.items():
        if info.dtype not in FLOAT_DTYPES or info.numel == 0:
            continue
        flat = model.load(name).reshape(-1)
        for start in range(0, flat.numel(), _SCAN_CHUNK):
            if not _all_finite(flat[start:start + _SCAN_CHUNK], info.dtype):
                bad.append(name)
                break
        del flat
    return bad


def _all_finite(chunk: "torch.Tensor", dtype: str) -> bool:
    import torch

    if dtype == "F64":  # the one dtype whose finite values can overflow a float64 sum
        return bool(torch.isfinite(chunk).all())
    if dtype in _NARROW_FLOATS:
        chunk = chunk.to(torch.float32)
    # a float64 sum of narrower finite values cannot overflow, and NaN/Inf always
    # propagate: one reduction instead of an elementwise test plus a reduction
    return bool(torch.isfinite(chunk.sum(dtype=torch.float64)))


def precision_of(model: ModelFile, component_of: Callable[[str], str]) -> Precision:
    """Dominant dtype (by element count) overall and per component; floats outrank ints."""
    per_component: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    overall: dict[str, int] = defaultdict(int)
    for name, info in model.infos.items():
        per_component[component_of(name)][info.dtype] += info.numel
        overall[info.dtype] += info.numel
    return Precision(
        dominant=_dominant(overall),
        components={comp: _dominant(counts) for comp, counts in per_component.items()},
    )


def _dominant(counts: dict[str, int]) -> str | None:
    # GGUF quantized weights are floats stored in blocks: a Q8_0 model is Q8_0 even
    # though its norms and biases stay F32
    floats = {dtype: n for dtype, n in counts.items()
              if dtype in FLOAT_DTYPES or dtype.startswith(GGUF_QUANT_PREFIX)}
    pool = floats or counts
    return max(pool, key=lambda dtype: (pool[dtype], dtype)) if pool else None
