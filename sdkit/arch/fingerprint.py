"""Match a transformer denoiser against the families' layouts and releases.

A family's `DenoiserLayout` names the keys its denoiser must have, with shape templates;
matching binds the template names (`hidden`, `context`, …) to the file's sizes, counts the
blocks and reads the flags. The bound sizes are then compared with the family's releases:
equal everywhere is that release; equal in design only (flags, input/output ratios) is a
model of that design with other sizes (a tiny test model, a pruned variant), which is
reported as non-standard. Files whose keys look like a transformer but match no layout are
described by what they hold, never given a family.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

from sdkit.arch.families import FAMILIES
from sdkit.arch.families.spec import DenoiserLayout, Dim, Family, Release, size_terms
from sdkit.arch.keyview import KeyView

# block lists of transformer denoisers, known or not: their presence at a root makes the
# file a transformer sdkit can at least describe
_BLOCK_LISTS = ("double_blocks", "single_blocks", "joint_blocks", "transformer_blocks",
                "single_transformer_blocks", "double_stream_blocks", "single_stream_blocks",
                "double_layers", "single_layers")
_DIM_WORDS = {"hidden": "transformer width", "context": "context width", "pooled": "pooled-vector width",
              "in_channels": "input channels", "out_channels": "output channels"}


@dataclass
class LayoutMatch:
    """A denoiser that one family's layout describes, with its measured sizes."""

    family: Family
    layout: DenoiserLayout
    dims: dict[str, int]  # bound template names and block counts
    flags: dict[str, bool]
    marker: str = ""  # the layout marker the file has (`double_blocks.`)


@dataclass
class ReleaseMatch:
    """Which release a matched denoiser is, and how sure the weights make that."""

    release: Release | None
    exact: bool  # every released size matches
    named_by_metadata: str | None = None  # the metadata value that named a look-alike release
    look_alikes: list[str] = field(default_factory=list)  # releases with the same keys and shapes
    mismatches: list[str] = field(default_factory=list)  # sizes that differ from `release`


def transformer_layouts() -> list[tuple[Family, DenoiserLayout]]:
    return [(family, layout) for family in FAMILIES.values() for layout in family.layouts]


def match_transformers(view: KeyView) -> list[LayoutMatch]:
    """Per family, the first of its layouts the keys under `view` satisfy (a sound file
    matches one family; a file mixing two models, more)."""
    matches: dict[str, LayoutMatch] = {}
    for family, layout in transformer_layouts():
        if family.name in matches or not any(view.has_prefix(marker) for marker in layout.markers):
            continue
        match = match_layout(view, family, layout)
        if match is not None:
            matches[family.name] = match
    return list(matches.values())


def match_layout(view: KeyView, family: Family, layout: DenoiserLayout) -> LayoutMatch | None:
    """`layout`'s sizes bound from the file, or None when a required key is missing or a
    shape contradicts the template."""
    shape = view.shape
    pairs = []
    for key, template in layout.shapes.items():
        found = shape(key)
        if found is None:
            return None
        pairs.append((template, found))
    pairs += [(template, shape(key)) for key, template in layout.optional_shapes.items()
              if shape(key) is not None]
    bound = _bind_all(pairs)
    if bound is None:
        return None
    for name, pattern in layout.counts.items():
        bound[name] = len(view.indices(pattern))
    flags = {name: view.has_prefix(prefix) for name, prefix in layout.flags.items()}
    marker = next((m for m in layout.markers if view.has_prefix(m)), layout.markers[0])
    return LayoutMatch(family, layout, bound, flags, marker)


def _bind_all(pairs: list[tuple[tuple[Dim, ...], tuple[int, ...]]]) -> dict[str, int] | None:
    """Bind plain names first (over every key), then check the compound sizes (`3*hidden`,
    `hidden+2*kv`); a name that appears only in compounds is bound from one where it is
    the only unknown (Wan's `4*out_channels`, Lumina 2's key/value width)."""
    bound: dict[str, int] = {}
    compounds: list[tuple[str, int]] = []
    for template, found in pairs:
        if len(template) != len(found):
            return None
        for want, got in zip(template, found):
            if isinstance(want, int) and got != want:
                return None
            if isinstance(want, str) and _is_plain(want) and bound.setdefault(want, got) != got:
                return None
            if isinstance(want, str) and not _is_plain(want):
                compounds.append((want, got))
    while _bind_one_unknown(compounds, bound):
        pass
    for want, got in compounds:
        if any(name and name not in bound for _, name in size_terms(want)) or _total(want, bound) != got:
            return None
    return bound


def bind_sizes(pairs: list[tuple[tuple[Dim, ...], tuple[int, ...]]]) -> dict[str, int] | None:
    """The size names that (shape template, shape) pairs bind, None when they contradict."""
    return _bind_all(pairs)


def _is_plain(template: str) -> bool:
    return "*" not in template and "+" not in template


def _total(template: str, bound: Mapping[str, int]) -> int:
    return sum(factor * (bound[name] if name else 1) for factor, name in size_terms(template))


def _bind_one_unknown(compounds: list[tuple[str, int]], bound: dict[str, int]) -> bool:
    """Bind the name of the first compound whose terms leave exactly one unknown; False
    when none does."""
    for want, got in compounds:
        terms = size_terms(want)
        unknown = {name for _, name in terms if name and name not in bound}
        if len(unknown) != 1:
            continue
        name = unknown.pop()
        factor = sum(f for f, n in terms if n == name)
        rest = got - sum(f * (bound[n] if n else 1) for f, n in terms if n != name)
        if rest <= 0 or rest % factor:
            return False
        bound[name] = rest // factor
        return True
    return False


def match_release(family: Family, dims: Mapping[str, int], flags: Mapping[str, bool],
                  architecture: str = "") -> ReleaseMatch:
    """The release these sizes and flags are; `architecture` is the file's
    `modelspec.architecture`, which alone can name releases that share every shape."""
    designs = [r for r in family.releases if _same_design(r, dims, flags)]
    exact = [r for r in designs if all(dims.get(k) == v for k, v in r.dims.items())]
    pool = exact or designs
    if not pool:
        return ReleaseMatch(None, False, mismatches=[f"no {family.title} release has this design"])
    words = architecture.strip().lower()
    named = [r for r in pool if r.named_by and any(word in words for word in r.named_by)]
    plain = [r for r in pool if not r.named_by]
    candidates = named or plain or pool
    if not exact:  # a model of the design with other sizes: the release it is closest to
        candidates = sorted(candidates, key=lambda r: len(_differences(r, dims)))
    chosen = candidates[0]
    return ReleaseMatch(
        release=chosen, exact=bool(exact),
        named_by_metadata=architecture.strip() if named else None,
        look_alikes=[r.name for r in exact if r is not chosen],
        mismatches=[] if exact else _differences(chosen, dims),
    )


def _same_design(release: Release, dims: Mapping[str, int], flags: Mapping[str, bool]) -> bool:
    if any(flags.get(name, False) != wanted for name, wanted in release.flags.items()):
        return False
    for name, (other, factor) in release.ratios.items():
        if name in dims and other in dims and dims[name] != factor * dims[other]:
            return False
    return True


def _differences(release: Release, dims: Mapping[str, int]) -> list[str]:
    return [f"{_DIM_WORDS.get(name, name.replace('_', ' '))} {dims.get(name, 'missing')} "
            f"({release.name} has {wanted})"
            for name, wanted in release.dims.items() if dims.get(name) != wanted]


def looks_like_transformer(view: KeyView) -> bool:
    """Keys of a transformer denoiser sdkit may not know: a block list at the root."""
    return any(view.has_prefix(name + ".") for name in _BLOCK_LISTS) or any(
        view.has_prefix(marker) for _, layout in transformer_layouts() for marker in layout.markers)


def describe_unknown_transformer(view: KeyView) -> tuple[str, dict[str, object]]:
    """What an unplaceable transformer holds: its block lists with their lengths and its
    most common width, and why the closest known layout did not fit."""
    blocks = {name: len(view.indices(re.escape(name) + r"\.(\d+)\.")) for name in _BLOCK_LISTS}
    blocks = {name: count for name, count in blocks.items() if count}
    width = _common_width(view)
    listed = " and ".join(f"{count} {name}" for name, count in blocks.items()) or "no numbered blocks"
    text = f"unknown transformer: {listed}" + (f" of width {width}" if width else "")
    reason = _closest_layout_gap(view)
    if reason:
        text += f" ({reason})"
    return text, {"blocks": blocks, "width": width, "not_matched": reason}


def _common_width(view: KeyView) -> int | None:
    """The most common input width of the 2-D weights in the first block of any list."""
    widths: Counter[int] = Counter()
    for name in view.names:
        first = name.split(".", 2)
        if len(first) == 3 and first[0] in _BLOCK_LISTS and first[1] == "0" and name.endswith(".weight"):
            shape = view.shape(name) or ()
            if len(shape) == 2:
                widths[shape[1]] += 1
    return widths.most_common(1)[0][0] if widths else None


def _closest_layout_gap(view: KeyView) -> str | None:
    """Of the layouts whose markers are present, the one missing fewest required keys: its
    first missing key, or that its shapes disagree, so the user sees why the file is not
    that family."""
    gaps = []
    for family, layout in transformer_layouts():
        if any(view.has_prefix(marker) for marker in layout.markers):
            gaps.append((family, [key for key in layout.shapes if view.shape(key) is None]))
    if not gaps:
        return None
    family, missing = min(gaps, key=lambda gap: len(gap[1]))
    if missing:
        return f"not {family.title}: no {missing[0]}"
    return f"not {family.title}: its shapes do not fit the {family.title} design"
