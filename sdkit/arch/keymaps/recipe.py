"""Lazy descriptions of how output tensors are made from input tensors.

A `KeyPlan` maps every output key to a `KeyRecipe`; nothing is computed until a recipe is
applied, so a streaming writer can produce outputs one at a time. Recipes never change
dtypes or values: a conversion followed by its inverse gives back the same bytes.

Plans are built from `Link`s: one link ties the tensor(s) of one place in the diffusers
layout to the tensor(s) of the same place in the LDM layout, with the rule that turns one
into the other. A link table therefore yields both directions, which is what makes them
exact inverses.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any, Callable, Iterable, Mapping

import torch

from sdkit.errors import SdkitError

DIRECTIONS = ("diffusers_to_ldm", "ldm_to_diffusers")


@dataclass(frozen=True)
class KeyRecipe:
    """How one output tensor is made from input tensors.

    kinds: "copy" (one source), "reshape" (arg: target shape), "transpose" (2-D),
    "concat" (along dim 0), "split" (arg: (index, parts), equal parts along dim 0),
    "slice" (arg: (start, stop) rows along dim 0; stop None: to the end),
    "swap" (the two halves along dim 0 trade places),
    "arange" (no source; arg: length; an int64 [1, length] position-id row),
    "fill" (arg: (shape, value); a tensor of that shape holding value everywhere, in the
    dtype of its one source, which is read for nothing else).
    """

    sources: tuple[str, ...]
    kind: str = "copy"
    arg: Any = None

    def apply(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if len(tensors) != len(self.sources):
            raise ValueError(f"{self.kind} recipe needs {len(self.sources)} tensors, got {len(tensors)}")
        maker = _MAKERS.get(self.kind)
        if maker is None:
            raise ValueError(f"unknown recipe kind {self.kind!r}")
        return maker(self, tensors)


KeyPlan = dict[str, KeyRecipe]


def _copy(recipe: KeyRecipe, tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _reshape(recipe: KeyRecipe, tensors: list[torch.Tensor]) -> torch.Tensor:
    tensor = tensors[0]
    if tensor.numel() != prod(recipe.arg):
        raise SdkitError(f"{recipe.sources[0]}: shape {tuple(tensor.shape)} cannot become {tuple(recipe.arg)}")
    return tensor.reshape(recipe.arg)


def _transpose(recipe: KeyRecipe, tensors: list[torch.Tensor]) -> torch.Tensor:
    tensor = tensors[0]
    if tensor.ndim != 2:
        raise SdkitError(f"{recipe.sources[0]}: expected a matrix, got shape {tuple(tensor.shape)}")
    return tensor.t().contiguous()


def _concat(recipe: KeyRecipe, tensors: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) != 1:
        raise SdkitError(f"{recipe.sources[0]}: parts to fuse have different shapes")
    return torch.cat(tensors, dim=0)


def _split(recipe: KeyRecipe, tensors: list[torch.Tensor]) -> torch.Tensor:
    tensor = tensors[0]
    index, parts = recipe.arg
    rows, rest = divmod(tensor.shape[0], parts)
    if rest:
        raise SdkitError(f"{recipe.sources[0]}: {tensor.shape[0]} rows do not split into {parts} parts")
    # a clone, not a view: safetensors refuses tensors that share storage
    return tensor[index * rows:(index + 1) * rows].clone()


def _slice(recipe: KeyRecipe, tensors: list[torch.Tensor]) -> torch.Tensor:
    tensor = tensors[0]
    start, stop = recipe.arg
    end = tensor.shape[0] if stop is None else stop
    if not 0 <= start < end <= tensor.shape[0]:
        raise SdkitError(f"{recipe.sources[0]}: {tensor.shape[0]} rows have no rows {start}:{end}")
    return tensor[start:end].clone()


def _swap(recipe: KeyRecipe, tensors: list[torch.Tensor]) -> torch.Tensor:
    tensor = tensors[0]
    half, rest = divmod(tensor.shape[0], 2)
    if rest:
        raise SdkitError(f"{recipe.sources[0]}: {tensor.shape[0]} rows do not split into halves")
    return torch.cat([tensor[half:], tensor[:half]], dim=0)


def _arange(recipe: KeyRecipe, tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.arange(recipe.arg, dtype=torch.int64).unsqueeze(0)


def _fill(recipe: KeyRecipe, tensors: list[torch.Tensor]) -> torch.Tensor:
    shape, value = recipe.arg
    return torch.full(tuple(shape), value, dtype=tensors[0].dtype)


_MAKERS: dict[str, Callable[[KeyRecipe, list[torch.Tensor]], torch.Tensor]] = {
    "copy": _copy, "reshape": _reshape, "transpose": _transpose,
    "concat": _concat, "split": _split, "slice": _slice, "swap": _swap, "arange": _arange,
    "fill": _fill,
}


def convert_state_dict(plan: KeyPlan, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply every recipe of `plan` to `tensors` at once (the eager counterpart of streaming)."""
    missing = [s for recipe in plan.values() for s in recipe.sources if s not in tensors]
    if missing:
        raise SdkitError(f"{missing[0]}: missing from the input ({len(missing)} keys missing)")
    return {key: recipe.apply([tensors[s] for s in recipe.sources]) for key, recipe in plan.items()}


def dropped_keys(plan: KeyPlan, keys: Iterable[str]) -> list[str]:
    """Input keys that no recipe of `plan` reads, in input order."""
    used = {source for recipe in plan.values() for source in recipe.sources}
    return [key for key in keys if key not in used]


# ---- links: one place in both layouts -------------------------------------------------

@dataclass(frozen=True)
class Link:
    """The tensors of one place in the diffusers and the LDM layout.

    kinds: "same" (one tensor each side, equal), "conv1x1" (diffusers Linear [C, C] ⇄ LDM
    1×1 conv [C, C, 1, 1]; arg C), "transpose" (each side the transpose of the other),
    "fused" (diffusers q, k, v ⇄ one LDM tensor, their concatenation along dim 0; arg:
    None for equal parts, else each part's rows, the last may be None for "the rest"),
    "swap" (each side the other with its two halves along dim 0 exchanged),
    "position_ids" (an LDM position-id row that the diffusers side may or may not hold;
    arg: length; made again when the input lacks it),
    "unused" (an LDM tensor the diffusers model lacks: dropped going to diffusers, made
    going back with the "fill" recipe, arg (shape, value), in the dtype of the one
    diffusers tensor named).
    """

    diffusers: tuple[str, ...]
    ldm: tuple[str, ...]
    kind: str = "same"
    arg: Any = None

    def inputs(self, direction: str) -> tuple[str, ...]:
        return self.diffusers if direction == "diffusers_to_ldm" else self.ldm

    def recipes(self, direction: str, sources: tuple[str, ...]) -> list[tuple[str, KeyRecipe]]:
        """(output key, recipe) pairs of this link, reading `sources` (the inputs, renamed)."""
        to_ldm = direction == "diffusers_to_ldm"
        outputs = self.ldm if to_ldm else self.diffusers
        if self.kind == "same":
            return [(outputs[0], KeyRecipe(sources))]
        if self.kind == "transpose":
            return [(outputs[0], KeyRecipe(sources, "transpose"))]
        if self.kind == "conv1x1":
            shape = (self.arg, self.arg, 1, 1) if to_ldm else (self.arg, self.arg)
            return [(outputs[0], KeyRecipe(sources, "reshape", shape))]
        if self.kind == "swap":
            return [(outputs[0], KeyRecipe(sources, "swap"))]
        if self.kind == "fused":
            if to_ldm:
                return [(outputs[0], KeyRecipe(sources, "concat"))]
            if self.arg is not None:
                return list(zip(outputs, _slices(sources, self.arg)))
            parts = len(outputs)
            return [(out, KeyRecipe(sources, "split", (i, parts))) for i, out in enumerate(outputs)]
        if self.kind == "unused":
            return [(outputs[0], KeyRecipe(sources, "fill", self.arg))] if to_ldm else []
        if self.kind == "position_ids":
            if not to_ldm:  # transformers 5 keeps position ids out of the state dict
                return []
            if sources:
                return [(outputs[0], KeyRecipe(sources))]
            return [(outputs[0], KeyRecipe((), "arange", self.arg))]
        raise ValueError(f"unknown link kind {self.kind!r}")


def _slices(sources: tuple[str, ...], sizes: tuple[int | None, ...]) -> list[KeyRecipe]:
    """Slice recipes cutting one tensor into parts of `sizes` rows (None: the rest)."""
    recipes, start = [], 0
    for size in sizes:
        stop = None if size is None else start + size
        recipes.append(KeyRecipe(sources, "slice", (start, stop)))
        start = stop if stop is not None else start
    return recipes


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")


def plan_from_links(links: Iterable[Link], direction: str) -> KeyPlan:
    """The plan for a complete model: every link, with its canonical input names."""
    check_direction(direction)
    plan: KeyPlan = {}
    for link in links:
        sources = link.inputs(direction)
        if link.kind == "position_ids" and direction == "diffusers_to_ldm":
            sources = ()  # a complete transformers 5 model holds no position ids
        plan.update(link.recipes(direction, sources))
    return plan


@dataclass(frozen=True)
class KeyRules:
    """How a component's actual key names relate to the canonical names of its links.

    canonical: actual input key -> canonical key (spelling variants, e.g. with or without
    `text_model.`); droppable: canonical input keys the output layout has no place for,
    which are left out instead of refused.
    """

    what: str
    canonical: Callable[[str], str] = lambda key: key
    droppable: Callable[[str], bool] = lambda key: False


def plan_from_keys(links: list[Link], direction: str, keys: Iterable[str], rules: KeyRules) -> KeyPlan:
    """The plan for the keys actually present: outputs whose inputs are all there.

    Keys that fit no link are refused unless `rules.droppable` allows leaving them out.
    """
    check_direction(direction)
    actual = canonical_names(keys, rules)
    known = {name for link in links for name in link.inputs(direction)}
    stray = [key for canon, key in actual.items() if canon not in known and not rules.droppable(canon)]
    if stray:
        shown = ", ".join(stray[:3])
        raise SdkitError(f"{rules.what}: {len(stray)} keys have no place in this layout ({shown})")
    plan: KeyPlan = {}
    for link in links:
        wanted = link.inputs(direction)
        present = [actual[name] for name in wanted if name in actual]
        if link.kind == "position_ids":
            if actual:  # made again when absent, so the output layout is always complete
                plan.update(link.recipes(direction, tuple(present)))
            continue
        if not present:
            continue
        if len(present) != len(wanted):
            lacking = next(name for name in wanted if name not in actual)
            raise SdkitError(f"{rules.what}: {lacking} is missing (needed with {present[0]})")
        plan.update(link.recipes(direction, tuple(present)))
    return plan


def canonical_names(keys: Iterable[str], rules: KeyRules) -> dict[str, str]:
    """Canonical name -> actual key; the same tensor spelled twice is refused."""
    actual: dict[str, str] = {}
    for key in keys:
        canon = rules.canonical(key)
        if canon in actual:
            raise SdkitError(f"{rules.what}: {key} and {actual[canon]} are the same tensor spelled twice")
        actual[canon] = key
    return actual
