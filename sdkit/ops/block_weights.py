"""Per-key weights of merges and LoRA bakes: a global alpha, per-component alphas, per-block alphas.

The most specific setting wins:

- a UNet key: its block's weight (`--blocks`), else the `unet` component weight, else
  the global alpha;
- a text-encoder key: its component weight (`text_encoder`, `text_encoder_2`, or `te`
  for both), else the `BASE` block weight (the text encoders sit in BASE, as in the
  webui tools), else the global alpha;
- a VAE key (only merged with `--vae merge`): the `vae` component weight, else the
  global alpha; block weights never touch the VAE;
- any other key (EMA copies, buffers): the `other` component weight, else the global alpha.

Block weights are written `BASE:0.5,IN00:0.2,…` (any subset of the model's ids) or as a
list of one value per block in the order BASE, IN00…, M00, OUT00… (26 values for
SD1/SD2, 20 for SDXL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from sdkit.arch.blocks import BASE, COMPONENTS, TEXT_ENCODERS, BlockLayout, component_of
from sdkit.errors import SdkitError

# names users may give for the same thing
_BLOCK_ALIASES = {"MID": "M00", "M": "M00", "M0": "M00"}
_COMPONENT_ALIASES = {"te": TEXT_ENCODERS, "clip": TEXT_ENCODERS, "text_encoders": TEXT_ENCODERS,
                      "te1": ("text_encoder",), "te2": ("text_encoder_2",), "model": ("unet",)}

BlockSpec = Mapping[str, float] | Sequence[float]


@dataclass(frozen=True)
class KeyWeights:
    """The alpha of every key, from the three levels of settings."""

    alpha: float
    components: Mapping[str, float] = field(default_factory=dict)
    blocks: Mapping[str, float] = field(default_factory=dict)
    layout: BlockLayout = field(default_factory=lambda: BlockLayout(0, 0, False))

    def alpha_for(self, key: str) -> float:
        component = component_of(key)
        if component == "unet":
            block = self.layout.block_of(key)
            return self.blocks.get(block, self.components.get("unet", self.alpha))
        if component in TEXT_ENCODERS:
            return self.components.get(component, self.blocks.get(BASE, self.alpha))
        return self.components.get(component, self.alpha)


def parse_number_list(text: str) -> list[float] | None:
    """"0.5,0.2,…" -> floats; None when the text is a `NAME:value` map instead."""
    parts = [part.strip() for part in text.replace(";", ",").split(",") if part.strip()]
    try:
        return [float(part) for part in parts]
    except ValueError:
        return None


def parse_assignments(text: str, what: str) -> dict[str, float]:
    """"NAME:0.5,NAME=0.2" -> {"NAME": 0.5, ...} (either separator)."""
    values: dict[str, float] = {}
    for part in (p.strip() for p in text.replace(";", ",").split(",")):
        if not part:
            continue
        name, sep, value = part.replace("=", ":").partition(":")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise SdkitError(f"{what}: {part!r} is not NAME:VALUE") from None
        if not sep:
            raise SdkitError(f"{what}: {part!r} is not NAME:VALUE")
    return values


def parse_block_spec(text: str) -> BlockSpec:
    """Command-line block weights: a number list or a NAME:value map."""
    numbers = parse_number_list(text)
    return numbers if numbers is not None else parse_assignments(text, "--blocks")


def resolve_blocks(spec: BlockSpec | None, layout: BlockLayout) -> dict[str, float]:
    """Block id -> alpha for this model's layout; refuses unknown ids and wrong counts."""
    if not spec:
        return {}
    ids = layout.ids
    if isinstance(spec, Mapping):
        resolved = {}
        for name, value in spec.items():
            block = _BLOCK_ALIASES.get(name.strip().upper(), name.strip().upper())
            if block not in ids:
                raise SdkitError(f"block weights: this model has no block {name!r} "
                                 f"(its blocks: {layout.describe()})")
            resolved[block] = float(value)
        return resolved
    values = [float(v) for v in spec]
    if len(values) != len(ids):
        raise SdkitError(f"block weights: this model has {len(ids)} blocks "
                         f"({layout.describe()}), got {len(values)} values")
    return dict(zip(ids, values))


def resolve_components(spec: Mapping[str, float] | None) -> dict[str, float]:
    """Component -> alpha with aliases expanded (`te` sets both text encoders)."""
    resolved: dict[str, float] = {}
    for name, value in (spec or {}).items():
        for component in component_names(name):
            resolved[component] = float(value)
    return resolved


def component_names(name: str) -> tuple[str, ...]:
    """The components a user-given name stands for ("te" -> both text encoders)."""
    key = name.strip().lower()
    if key in _COMPONENT_ALIASES:
        return _COMPONENT_ALIASES[key]
    if key in COMPONENTS:
        return (key,)
    raise SdkitError(f"unknown component {name!r} (known: {', '.join(COMPONENTS)}, te)")
