"""Single-file ⇄ diffusers key maps of transformer denoisers, built from a family's `KeyMap`.

A family module states its map as data (`sdkit.arch.families.spec.KeyMap`: places outside
the blocks, and per block list the places of one block); the sizes that fused tensors are
cut by (`hidden`, the MLP width as "the rest") and the number of blocks come from the file
itself, through the layout match that identified it. The map becomes `Link`s, so both
directions come from one table and are exact inverses: q, k and v cut from a fused `qkv`
by row slices and joined again give back the same bytes.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from sdkit.arch.families.spec import BlockMap, Dim, Family, KeyMap, Place, Release, size_terms
from sdkit.arch.keymaps.recipe import KeyPlan, KeyRecipe, KeyRules, Link, canonical_names, plan_from_keys
from sdkit.errors import SdkitError

_LINK_KINDS = {"same": "same", "fused": "fused", "swap": "swap", "unused": "unused"}


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
        arg = (sizes, place.fill) if place.kind == "unused" else sizes
        links.append(Link(diffusers, ldm, _LINK_KINDS[place.kind], arg))
    return links


def _resolved_sizes(sizes: tuple[Dim, ...], dims: Mapping[str, int]) -> tuple[int | None, ...]:
    return tuple(_size(size, dims) for size in sizes)


def _size(size: Dim, dims: Mapping[str, int]) -> int | None:
    if size is None or isinstance(size, int):
        return size
    total = 0
    for factor, name in size_terms(size):
        if name and name not in dims:
            raise SdkitError(f"the key map needs the size {name!r}, which the layout did not measure")
        total += factor * (dims[name] if name else 1)
    return total


def transformer_plan(family: Family, dims: Mapping[str, int], direction: str, keys: Iterable[str],
                     prefix: str = "") -> KeyPlan:
    """The plan converting a `family` transformer's `keys` (named with `prefix`, e.g.
    `model.diffusion_model.`) in `direction`; output names carry no prefix. Keys with no
    place in the map are refused, naming the first few; a same-names map keeps every key."""
    if family.key_map is None:
        raise SdkitError(f"sdkit has no single-file ⇄ diffusers key map for {family.title} yet")
    rules = KeyRules(f"{family.title} transformer", canonical=lambda key: key[len(prefix):]
                     if prefix and key.startswith(prefix) else key)
    if family.key_map.same_names:
        return {name: KeyRecipe((key,)) for name, key in canonical_names(keys, rules).items()}
    return plan_from_keys(transformer_links(family.key_map, dims), direction, keys, rules)


def diffusers_config(family: Family, dims: Mapping[str, int], flags: Mapping[str, bool],
                     release: Release | None, exact: bool) -> dict[str, Any]:
    """The diffusers config.json values of a `family` transformer of these measured sizes.

    What the weights show is taken from them; the rest from the release the sizes match
    (`exact`), or from the family's released config where no unmeasured value depends on
    the sizes. A model with other sizes whose config the weights cannot complete is
    refused, naming the values it lacks."""
    model = family.diffusers_model
    if model is None:
        raise SdkitError(f"sdkit has no diffusers config for {family.title} transformers yet")
    if not exact and model.unmeasured:
        raise SdkitError(f"its sizes match no {family.title} release, and its weights do not show "
                         f"{', '.join(model.unmeasured)}; give --config with a diffusers folder "
                         "(transformer/config.json) of this model")
    config = {**model.config, **(release.config if release else {})}
    for key, source in model.measured.items():
        config[key] = _measured(source, dims, flags, family)
    return {"_class_name": model.class_name, **config}


def check_config(family: Family, config: Mapping[str, Any], dims: Mapping[str, int],
                 flags: Mapping[str, bool]) -> None:
    """Refuse a given config that contradicts the weights (it would build another model)."""
    model = family.diffusers_model
    for key, source in (model.measured.items() if model else ()):
        value = _measured(source, dims, flags, family)
        if key in config and config[key] is not None and config[key] != value:
            raise SdkitError(f"the given config says {key} = {config[key]!r}, but the weights have {value!r}")


def _measured(source: str, dims: Mapping[str, int], flags: Mapping[str, bool], family: Family) -> Any:
    if source.startswith("flag:"):
        return bool(flags.get(source[len("flag:"):], False))
    names = source.split("/")
    missing = [name for name in names if not name.isdigit() and name not in dims]
    if missing:
        raise SdkitError(f"the {family.title} layout did not measure {missing[0]!r}")
    value = dims[names[0]]
    for name in names[1:]:
        value //= int(name) if name.isdigit() else dims[name]
    return value
