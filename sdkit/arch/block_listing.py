"""The merge block ids of a family's released models, for `sdkit merge --list-blocks`."""

from __future__ import annotations

from typing import Any

from sdkit.arch.block_presets import transformer_preset_names, unet_preset_names
from sdkit.arch.blocks import BlockLayout
from sdkit.arch.families import FAMILIES
from sdkit.arch.families.spec import Family
from sdkit.arch.transformer_blocks import is_transformer_family, released_transformer_blocks
from sdkit.errors import SdkitError

_BLOCKS_PER_LEVEL = 3  # an LDM UNet level: two resnet (+attention) blocks and a sampler


def find_family(name: str) -> Family:
    """A family by its name, case-insensitive; a unique start of a name will do, and a
    start shared by a base model and its relatives names the base (`sdxl`)."""
    wanted = name.strip().lower()
    if wanted in FAMILIES:
        return FAMILIES[wanted]
    starting = [family for key, family in FAMILIES.items() if key.startswith(wanted)]
    base = [family for family in starting if family.name == f"{wanted}-base"]
    if len(starting) == 1 or base:
        return (base or starting)[0]
    raise SdkitError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")


def family_block_listing(name: str) -> dict[str, Any]:
    """Per released size of the family, its block ids in `--blocks` order with what each
    holds, and the presets that fit it."""
    family = find_family(name)
    if is_transformer_family(family.name):
        sizes = [(releases, layout) for releases, layout in released_transformer_blocks(family.name)]
        presets = transformer_preset_names()
    else:
        blocks = _BLOCKS_PER_LEVEL * (family.unet_levels or 0)
        sizes = [([family.title], BlockLayout(blocks, blocks, True))]
        presets = unet_preset_names()
    return {
        "family": family.name, "title": family.title, "presets": presets,
        "sizes": [{"releases": releases,
                   "blocks": [{"id": block, "covers": layout.covers(block)} for block in layout.ids]}
                  for releases, layout in sizes],
    }
