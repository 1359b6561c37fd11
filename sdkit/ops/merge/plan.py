"""Deciding, before any tensor is read, what every output key will be.

For each key of the union of the inputs (all aligned to one key space first):

- a key the method merges needs the same shape in every input; a missing input makes it
  a copy from the first input that has it (A first), and the report lists it;
- keys present only in later inputs (B, C, …) are copied from the first input holding
  them, and reported — nothing is dropped;
- integer and boolean tensors (step counters) and CLIP position ids (whatever their
  dtype) are never averaged: they are copied from the first input holding them;
- a component set to come from one input (`take`, the VAE by default) is copied from
  that input; where it lacks the key, from the first input that has it (reported);
- the one allowed shape difference is the first UNet convolution of an inpainting or
  instruct-pix2pix A (9 or 8 input channels) against plain models (4): the shared
  channels are merged and A's extra channels kept, as the webui merger does.

Mismatched shapes are refused here, naming the key, so no output byte is ever written
for an impossible merge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sdkit.arch.blocks import component_of, unet_relative
from sdkit.errors import SdkitError
from sdkit.io.model_file import FLOAT_DTYPES, TensorInfo, loaded_dtype, tensor_nbytes
from sdkit.ops.block_weights import KeyWeights
from sdkit.ops.merge.registry import MergeMethod, input_letter

MERGE = "merge"
FIRST_UNET_CONV = "input_blocks.0.0.weight"
# CLIP position ids are indices even when a careless merge stored them as floats
_NEVER_AVERAGED = ("position_ids",)


@dataclass(frozen=True)
class AlignedInput:
    """One input model seen in the common key space."""

    name: str  # "A", "B", ...
    path: str
    infos: dict[str, TensorInfo]
    load: Callable[[str], Any]
    span: Callable[[str], Any] = lambda key: None  # the key's stored bytes (io.ByteSpan), if any
    # a key stored in blocks (GGUF): read(start, count) of its float32 elements, if any
    elements: Callable[[str], Any] = lambda key: None
    # an earlier step's output (nothing stored): the key's values made slice by slice, as a
    # streamed.SliceReader of float32 slices of the step's output dtype
    slices: Callable[[str], Any] | None = None


@dataclass(frozen=True)
class KeyAction:
    """What to do for one output key."""

    key: str
    merged: bool  # run the method (else: copy the one source)
    sources: tuple[int, ...]  # input indices read: all inputs to merge, one to copy
    dtype: str  # output dtype code
    shape: tuple[int, ...]
    alpha: float | None = None  # the method's alpha for this key (merges only)
    channels: int | None = None  # merge only the first `channels` of dim 1 (inpainting A)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass
class PlanReport:
    """What the merge does besides the method itself, for the user to see."""

    merged: int = 0
    copied: dict[str, int] = field(default_factory=dict)  # input name -> keys copied from it
    missing: dict[str, list[str]] = field(default_factory=dict)  # input -> merged keys it lacks
    only_in: dict[str, list[str]] = field(default_factory=dict)  # input -> keys absent from A
    components_taken: dict[str, str] = field(default_factory=dict)  # component -> input
    partial_channels: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "merged": self.merged, "copied": self.copied, "missing": self.missing,
            "only_in": self.only_in, "components_taken": self.components_taken,
            "partial_channels": self.partial_channels,
        }


@dataclass
class MergePlan:
    actions: list[KeyAction]
    report: PlanReport

    @property
    def output_bytes(self) -> int:
        return sum(action.nbytes for action in self.actions)


def build_plan(inputs: Sequence[AlignedInput], method: MergeMethod, params: dict[str, Any],
               weights: KeyWeights, sources: dict[str, str | int], dtype_code: str | None) -> MergePlan:
    """The action for every key; `sources` maps a component to MERGE or an input index."""
    report = PlanReport()
    actions = []
    copy_all = method.source_index(params)
    for key in _union_keys(inputs):
        holders = [i for i, model in enumerate(inputs) if key in model.infos]
        default = copy_all if copy_all is not None else MERGE
        wanted = sources.get(weights.component_of(key), default)
        action = _action_for(key, inputs, holders, wanted, method, weights, dtype_code, report)
        actions.append(action)
        if action.merged:
            report.merged += 1
        else:
            name = inputs[action.sources[0]].name
            report.copied[name] = report.copied.get(name, 0) + 1
    for component, source in sources.items():
        if source != MERGE:
            report.components_taken[component] = input_letter(int(source))
    return MergePlan(actions, report)


def _union_keys(inputs: Sequence[AlignedInput]) -> list[str]:
    seen: dict[str, None] = {}
    for model in inputs:
        seen.update(dict.fromkeys(model.infos))
    return list(seen)


def _action_for(key: str, inputs: Sequence[AlignedInput], holders: list[int], wanted: str | int,
                method: MergeMethod, weights: KeyWeights, dtype_code: str | None,
                report: PlanReport) -> KeyAction:
    first = holders[0]
    if first != 0:
        report.only_in.setdefault(inputs[first].name, []).append(key)
    if wanted != MERGE:
        source = int(wanted) if int(wanted) in holders else first
        if source != int(wanted) and first == 0:
            report.missing.setdefault(inputs[int(wanted)].name, []).append(key)
        return _copy(key, inputs[source], source, dtype_code)
    if not _is_float(inputs[first].infos[key]) or key.endswith(_NEVER_AVERAGED):
        return _copy(key, inputs[first], first, dtype_code)
    if len(holders) < len(inputs):
        if first == 0:  # keys absent from A are reported once, under only_in
            for index in sorted(set(range(len(inputs))) - set(holders)):
                report.missing.setdefault(inputs[index].name, []).append(key)
        return _copy(key, inputs[first], first, dtype_code)
    channels = _merged_channels(key, inputs)
    if channels is not None:
        report.partial_channels.append(key)
    info = inputs[0].infos[key]
    alpha = weights.alpha_for(key) if method.has_alpha else None
    return KeyAction(key, True, tuple(range(len(inputs))), _out_dtype(info, dtype_code),
                     info.shape, alpha=alpha, channels=channels)


def _copy(key: str, model: AlignedInput, index: int, dtype_code: str | None) -> KeyAction:
    info = model.infos[key]
    return KeyAction(key, False, (index,), _out_dtype(info, dtype_code), info.shape)


def _is_float(info: TensorInfo) -> bool:
    return loaded_dtype(info.dtype) in FLOAT_DTYPES


def _out_dtype(info: TensorInfo, dtype_code: str | None) -> str:
    # a GGUF quantized input is merged (and written) as the float32 it loads as
    return dtype_code if dtype_code and _is_float(info) else loaded_dtype(info.dtype)


def _merged_channels(key: str, inputs: Sequence[AlignedInput]) -> int | None:
    """None when all shapes agree; the shared channel count for an inpainting A."""
    shapes = [model.infos[key].shape for model in inputs]
    if all(shape == shapes[0] for shape in shapes):
        return None
    if component_of(key) == "unet" and unet_relative(key) == FIRST_UNET_CONV:
        return _inpainting_channels(key, inputs, shapes)
    raise SdkitError(f"{key}: shapes differ ({_shapes_text(inputs, shapes)}); "
                     "these models cannot be merged")


def _inpainting_channels(key: str, inputs: Sequence[AlignedInput],
                         shapes: list[tuple[int, ...]]) -> int:
    a, rest = shapes[0], shapes[1:]
    same_elsewhere = all(len(s) == 4 and s[:1] + s[2:] == a[:1] + a[2:] for s in rest)
    narrower = {s[1] for s in rest}
    if len(a) != 4 or not same_elsewhere or len(narrower) != 1:
        raise SdkitError(f"{key}: shapes differ ({_shapes_text(inputs, shapes)}); "
                         "these models cannot be merged")
    channels = narrower.pop()
    if channels > a[1]:
        raise SdkitError(f"{key}: A has {a[1]} input channels and another input {channels}; "
                         "put the inpainting / instruct-pix2pix model first (as A)")
    return channels


def _shapes_text(inputs: Sequence[AlignedInput], shapes: list[tuple[int, ...]]) -> str:
    return ", ".join(f"{model.name} {list(shape)}" for model, shape in zip(inputs, shapes))
