"""Which component and which UNet block a checkpoint key belongs to (merge block weights).

Block ids follow the convention of the webui merge tools: `BASE`, `IN00`…, `M00`,
`OUT00`…. They are derived from the model's own structure (`input_blocks.N` → `INnn`,
`middle_block.*` → `M00`, `output_blocks.N` → `OUTnn`), not from a fixed key list, so an
SD1/SD2 UNet gives the 26 ids BASE, IN00–IN11, M00, OUT00–OUT11, an SDXL UNet the 20 ids
BASE, IN00–IN08, M00, OUT00–OUT08, and a tiny test UNet however many it has.

Where the keys outside the numbered blocks go (the tools disagree; this is sdkit's rule):

- `time_embed.*`, `label_emb.*` and any other UNet key outside the numbered blocks and
  the final output layers → `BASE` (as sd-mecha; supermerger puts time_embed in IN00);
- the final output layers `out.*` (norm and conv after the last output block) → the last
  `OUTnn` (all tools agree);
- the text encoders → `BASE` (as supermerger and sd-mecha);
- the VAE and anything else (EMA copies, scheduler buffers) → no block: block weights
  never touch them. The VAE follows its own component setting instead.

Keys are LDM single-file names (`model.diffusion_model.input_blocks.1.1.…`), with or
without the checkpoint prefixes; diffusers UNet names are mapped through
`sdkit.arch.keymaps` (see `diffusers_unet_blocks`).

Transformer diffusion models (FLUX.1, SD3, Wan, …) have block ids of their own (`IN`,
`D00`…, `S00`…, `OUT`): see `sdkit.arch.transformer_blocks`. `model_block_layout` picks
the one that fits a model's family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Union

if TYPE_CHECKING:
    from sdkit.arch.transformer_blocks import TransformerBlocks

BASE = "BASE"

# component name -> key prefixes in an LDM single-file checkpoint
# (SDXL embedders are named by what they hold, not their index: the refiner's only
# embedder, OpenCLIP bigG, is `text_encoder_2` as in diffusers)
COMPONENT_PREFIXES: dict[str, tuple[str, ...]] = {
    "unet": ("model.diffusion_model.",),
    "text_encoder": ("cond_stage_model.",),
    "vae": ("first_stage_model.",),
}
_SDXL_EMBEDDER = re.compile(r"^conditioner\.embedders\.\d+\.(model|transformer)\.")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet", *TEXT_ENCODERS, "vae", "other")

# keys of files holding one component without the checkpoint prefix
_BARE_UNET = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)\.")
_BARE_VAE = re.compile(r"^(encoder|decoder|quant_conv|post_quant_conv)\.")
_BARE_TEXT = re.compile(r"^(text_model|transformer\.text_model|model\.transformer\.resblocks)\.")

_INPUT = re.compile(r"^input_blocks\.(\d+)\.")
_OUTPUT = re.compile(r"^output_blocks\.(\d+)\.")
_MIDDLE = "middle_block."
_FINAL_OUT = "out."


def component_of(key: str) -> str:
    """"unet", "text_encoder", "text_encoder_2", "vae" or "other" for an LDM key."""
    for component, prefixes in COMPONENT_PREFIXES.items():
        if key.startswith(prefixes):
            return component
    if match := _SDXL_EMBEDDER.match(key):
        return "text_encoder_2" if match.group(1) == "model" else "text_encoder"
    if _BARE_UNET.match(key):
        return "unet"
    if _BARE_VAE.match(key):
        return "vae"
    if _BARE_TEXT.match(key):
        return "text_encoder"
    return "other"


def unet_relative(key: str) -> str:
    """The key inside the UNet (`input_blocks.1.1.…`), prefix removed."""
    prefix = COMPONENT_PREFIXES["unet"][0]
    return key[len(prefix):] if key.startswith(prefix) else key


@dataclass(frozen=True)
class BlockLayout:
    """The block ids of one UNet, in supermerger order: BASE, INs, M00, OUTs."""

    input_blocks: int
    output_blocks: int
    has_middle: bool
    names: frozenset[str] = field(default=frozenset(), compare=False)  # UNet keys, prefix removed

    @property
    def aliases(self) -> dict[str, str]:
        """Other spellings of ids: `MID`, and the LDM names ComfyUI's merge nodes use."""
        aliases = {"MID": "M00", "M": "M00", "M0": "M00", "middle_block": "M00", "middle_block.": "M00"}
        for side, count, block in (("input_blocks", self.input_blocks, "IN"),
                                   ("output_blocks", self.output_blocks, "OUT")):
            for i in range(count):
                aliases[f"{side}.{i}"] = aliases[f"{side}.{i}."] = f"{block}{i:02d}"
        return aliases

    @property
    def ids(self) -> tuple[str, ...]:
        middle = ("M00",) if self.has_middle else ()
        return (BASE, *(f"IN{i:02d}" for i in range(self.input_blocks)), *middle,
                *(f"OUT{i:02d}" for i in range(self.output_blocks)))

    def describe(self) -> str:
        """Compact id list for messages: `BASE, IN00–IN11, M00, OUT00–OUT11`."""
        parts = [BASE]
        if self.input_blocks:
            parts.append(f"IN00–IN{self.input_blocks - 1:02d}")
        if self.has_middle:
            parts.append("M00")
        if self.output_blocks:
            parts.append(f"OUT00–OUT{self.output_blocks - 1:02d}")
        return ", ".join(parts)

    def covers(self, block: str) -> str:
        """What an id holds, in LDM key names (for listings)."""
        if block == BASE:
            return "the text encoders, time_embed, label_emb"
        if block == "M00":
            return "middle_block."
        number = int(block.lstrip("INOUT"))
        if block.startswith("IN"):
            return f"input_blocks.{number}."
        last = " and the final out." if number == self.output_blocks - 1 else ""
        return f"output_blocks.{number}.{last}"

    component_of = staticmethod(component_of)
    relative = staticmethod(unet_relative)

    def block_of(self, key: str) -> str | None:
        """The block id of an LDM checkpoint key, or None for keys outside any block."""
        component = component_of(key)
        if component in TEXT_ENCODERS:
            return BASE
        if component != "unet":
            return None
        return self._unet_block(unet_relative(key))

    def _unet_block(self, relative: str) -> str:
        match = _INPUT.match(relative)
        if match:
            return f"IN{int(match.group(1)):02d}"
        if relative.startswith(_MIDDLE):
            return "M00"
        match = _OUTPUT.match(relative)
        if match:
            return f"OUT{int(match.group(1)):02d}"
        if relative.startswith(_FINAL_OUT) and self.output_blocks:
            return f"OUT{self.output_blocks - 1:02d}"
        return BASE


def block_layout(keys: Iterable[str]) -> BlockLayout:
    """The layout of the UNet whose LDM keys are among `keys` (numbers taken from the keys)."""
    keys = list(keys)
    inputs: set[int] = set()
    outputs: set[int] = set()
    middle = False
    for key in keys:
        if component_of(key) != "unet":
            continue
        relative = unet_relative(key)
        if match := _INPUT.match(relative):
            inputs.add(int(match.group(1)))
        elif match := _OUTPUT.match(relative):
            outputs.add(int(match.group(1)))
        elif relative.startswith(_MIDDLE):
            middle = True
    # numbered from 0 without gaps in every UNet; the highest index fixes the count
    return BlockLayout(
        input_blocks=max(inputs) + 1 if inputs else 0,
        output_blocks=max(outputs) + 1 if outputs else 0,
        has_middle=middle,
        names=frozenset(unet_relative(key) for key in keys if component_of(key) == "unet"),
    )


Layout = Union[BlockLayout, "TransformerBlocks"]


def model_block_layout(family: str | None, keys: Iterable[str]) -> Layout:
    """The block ids of a model of `family` with these keys: a transformer family's
    (`sdkit.arch.transformer_blocks`), else the UNet's."""
    from sdkit.arch.transformer_blocks import is_transformer_family, transformer_blocks

    if family and is_transformer_family(family):
        return transformer_blocks(family, keys)
    return block_layout(keys)



def diffusers_unet_blocks(config: Mapping[str, Any], keys: Iterable[str]) -> dict[str, str]:
    """Block id of every diffusers UNet key (`down_blocks.0.resnets.1.…`), found by
    mapping the keys to LDM names with the UNet key map of `config` (a diffusers config)."""
    from sdkit.arch.keymaps.unet import unet_plan_for_keys

    plan = unet_plan_for_keys(config, list(keys), "diffusers_to_ldm")
    layout = block_layout(plan)
    return {source: layout.block_of(ldm) or BASE
            for ldm, recipe in plan.items() for source in recipe.sources}
