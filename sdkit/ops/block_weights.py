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
SD1/SD2, 20 for SDXL), or as a preset name (`GRAD_V`, see `sdkit.arch.block_presets`).

Transformer diffusion models (FLUX.1, SD3, Wan, …) have their own ids, `IN`, `D00`…,
`S00`…, `B00`…, `OUT` (`sdkit.arch.transformer_blocks`); their text encoders, where a
checkpoint holds them, follow their component weight. A name that is no id may be a
key prefix of the diffusion model, relative to its root, as ComfyUI's per-block merge
nodes name them (`img_in.`, `time_embed.`, `double_blocks.`): it sets the keys under it,
the longest such prefix winning over the block id. It must reach at least one key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from sdkit.arch.block_presets import is_preset_name, preset_values
from sdkit.arch.blocks import BASE, COMPONENTS, TEXT_ENCODERS, BlockLayout, Layout
from sdkit.errors import SdkitError

# names users may give for the same thing
_COMPONENT_ALIASES = {"te": TEXT_ENCODERS, "clip": TEXT_ENCODERS, "text_encoders": TEXT_ENCODERS,
                      "te1": ("text_encoder",), "te2": ("text_encoder_2",), "model": ("unet",)}

BlockSpec = Mapping[str, float] | Sequence[float] | str  # str: a preset name


@dataclass(frozen=True)
class KeyWeights:
    """The alpha of every key, from the three levels of settings."""

    alpha: float
    components: Mapping[str, float] = field(default_factory=dict)
    blocks: Mapping[str, float] = field(default_factory=dict)  # block ids and key prefixes
    layout: Layout = field(default_factory=lambda: BlockLayout(0, 0, False))

    def component_of(self, key: str) -> str:
        return self.layout.component_of(key)

    def alpha_for(self, key: str) -> float:
        component = self.component_of(key)
        if component == "unet":
            found = block_setting(self.blocks, self.layout, key)
            return self.components.get("unet", self.alpha) if found is None else found
        if component in TEXT_ENCODERS:
            return self.components.get(component, self.blocks.get(BASE, self.alpha))
        return self.components.get(component, self.alpha)


def block_setting(settings: Mapping[str, float], layout: Layout, key: str) -> float | None:
    """The block-level value for a diffusion-model key: the longest key prefix set that
    holds it, else its block id's value; None when neither is set."""
    if not settings:
        return None
    relative = layout.relative(key)
    prefixes = [name for name in settings if name not in layout.ids and relative.startswith(name)]
    if prefixes:
        return settings[max(prefixes, key=len)]
    return settings.get(layout.block_of(key) or "")


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
    """Command-line block weights: a number list, a NAME:value map or a preset name."""
    numbers = parse_number_list(text)
    if numbers is not None:
        return numbers
    if is_preset_name(text):
        return text.strip().upper()
    return parse_assignments(text, "--blocks")


def resolve_blocks(spec: BlockSpec | None, layout: Layout) -> dict[str, float]:
    """Block id (or key prefix) -> alpha for this model's layout; refuses names that reach
    no key and lists of the wrong length."""
    if not spec:
        return {}
    ids = layout.ids
    if isinstance(spec, str):
        return dict(zip(ids, preset_values(spec, ids, transformer=not isinstance(layout, BlockLayout))))
    if isinstance(spec, Mapping):
        return {_block_name(name, layout): float(value) for name, value in spec.items()}
    values = [float(v) for v in spec]
    if len(values) != len(ids):
        raise SdkitError(f"block weights: this model has {len(ids)} blocks "
                         f"({layout.describe()}), got {len(values)} values")
    return dict(zip(ids, values))


def _block_name(name: str, layout: Layout) -> str:
    """A block id, or a key prefix that reaches at least one of the model's keys."""
    given = name.strip()
    block = layout.aliases.get(given.upper(), layout.aliases.get(given, given.upper()))
    if block in layout.ids:
        return block
    if given and any(relative.startswith(given) for relative in layout.names):
        return given
    what = "no key of this model starts with" if "." in given or given != given.upper() else "this model has no block"
    raise SdkitError(f"block weights: {what} {name!r} (its blocks: {layout.describe()})")


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
