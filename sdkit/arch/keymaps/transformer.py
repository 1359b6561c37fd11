"""Single-file ⇄ diffusers key maps of transformer denoisers, built from a family's `KeyMap`.

A family module states its map as data (`sdkit.arch.families.spec.KeyMap`: places outside
the blocks, and per block list the places of one block); the sizes that fused tensors are
cut by (`hidden`, the MLP width as "the rest") and the number of blocks come from the file
itself, through the layout match that identified it. The map becomes `Link`s, so both
directions come from one table and are exact inverses: q, k and v cut from a fused `qkv`
by row slices and joined again give back the same bytes.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from sdkit.arch.families.spec import BlockMap, Dim, Family, KeyMap, Place
from sdkit.arch.keymaps.recipe import KeyPlan, KeyRules, Link, plan_from_keys
from sdkit.errors import SdkitError

_LINK_KINDS = {"same": "same", "fused": "fused", "swap": "swap"}


def transformer_links(key_map: KeyMap, dims: Mapping[str, int]) -> list[Link]:
    """Every link of a transformer whose sizes and block counts are `dims`."""
    links = [link for place in key_map.places for link in _place_links(place, "", "", dims)]
    for block in key_map.blocks:
        count = dims.get(block.count, 0)
        for index in range(count):
            ldm, diffusers = block.ldm.format(i=index), block.diffusers.format(i=index)
            for place in _block_places(block, last=index == count - 1):
                links += _place_links(place, ldm, diffusers, dims)
    return links


def _block_places(block: BlockMap, last: bool) -> tuple[Place, ...]:
    if not last or not block.last:
        return block.places
    replaced = {place.ldm for place in block.last}
    return tuple(place for place in block.places if place.ldm not in replaced) + block.last


def _place_links(place: Place, ldm_prefix: str, diffusers_prefix: str, dims: Mapping[str, int]) -> list[Link]:
    sizes = _resolved_sizes(place.sizes, dims) if place.sizes else None
    links = []
    for param in place.params or ("",):
        suffix = f".{param}" if param else ""
        ldm = (ldm_prefix + place.ldm + suffix,)
        diffusers = tuple(diffusers_prefix + name + suffix for name in place.diffusers)
        links.append(Link(diffusers, ldm, _LINK_KINDS[place.kind], sizes))
    return links


def _resolved_sizes(sizes: tuple[Dim, ...], dims: Mapping[str, int]) -> tuple[int | None, ...]:
    return tuple(_size(size, dims) for size in sizes)


def _size(size: Dim, dims: Mapping[str, int]) -> int | None:
    if size is None or isinstance(size, int):
        return size
    factor, _, name = size.rpartition("*")
    if name not in dims:
        raise SdkitError(f"the key map needs the size {name!r}, which the layout did not measure")
    return int(factor or 1) * dims[name]


def transformer_plan(family: Family, dims: Mapping[str, int], direction: str, keys: Iterable[str],
                     prefix: str = "") -> KeyPlan:
    """The plan converting a `family` transformer's `keys` (named with `prefix`, e.g.
    `model.diffusion_model.`) in `direction`; output names carry no prefix. Keys with no
    place in the map are refused, naming the first few."""
    if family.key_map is None:
        raise SdkitError(f"sdkit has no single-file ⇄ diffusers key map for {family.title} yet")
    rules = KeyRules(f"{family.title} transformer", canonical=lambda key: key[len(prefix):]
                     if prefix and key.startswith(prefix) else key)
    return plan_from_keys(transformer_links(family.key_map, dims), direction, keys, rules)
