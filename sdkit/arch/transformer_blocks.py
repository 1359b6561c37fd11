"""Merge block ids of transformer diffusion models (FLUX.1, FLUX.2, Chroma, SD3.x, Z-Image,
Qwen-Image, Lumina 2, HiDream, Wan, Anima), in both of each family's key conventions.

The ids come from the family's own data, not from a table per family: every numbered
block list a family's `DenoiserLayout.counts` measures is either a stack of blocks or a
part of the input / output side, by the name of the count:

- `double_blocks` → `D00`, `D01`, … (FLUX.1, FLUX.2, Chroma, HiDream double-stream blocks);
- `single_blocks` → `S00`, … (their single-stream blocks);
- `depth`, `blocks`, `layers` → `B00`, … (the one stack of SD3 `joint_blocks`, Wan, Anima
  and Qwen-Image `blocks` / `transformer_blocks`, Z-Image and Lumina 2 `layers`);
- `refiner_layers` (Z-Image / Lumina 2 noise and context refiners, which run on the
  image and caption tokens before the main stack) and `approximator_layers` (Chroma's
  `distilled_guidance_layer`, which computes every block's modulation) → `IN`;
- `nerf_blocks` (Chroma Radiance's pixel decoder head) → `OUT`.

The order of a positional list is `IN`, the stacks in the order the family lists them
(double before single: the order the model runs them), then `OUT` — supermerger's FLUX
order (`IN`, `D00`–`D18`, `S00`–`S37`, `OUT`) without its two text-encoder entries, which
sdkit weighs per component instead.

Keys outside the numbered stacks (sdkit's rule, as supermerger's for FLUX: its `IN` takes
the `*_in` embedders, its `OUT` the `final_layer`):

- `OUT`: the modules after the last block, by their root name — `final_layer`,
  `all_final_layer` (Z-Image, diffusers), `norm_out` and `proj_out` (diffusers), `head`
  (Wan), root `scale_shift_table` (Wan, diffusers: the head's modulation), `norm_final`
  (Lumina 2, unused) and Chroma Radiance's NeRF head (`nerf_image_embedder`,
  `nerf_blocks`, `nerf_final_layer`, `nerf_final_layer_conv`): they write the output;
- `IN`: every other key — the patch, text, time, guidance and pooled-vector embedders
  (`img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`, `x_embedder`,
  `context_embedder`, `time_text_embed`, `pos_embed`, `patch_embedding`, …), the
  modulation layers shared by all blocks (FLUX.2 `*_stream_modulation*`, Chroma's
  approximator), the refiners and pad tokens: what conditions the blocks, computed
  before the first one.

The diffusers twin of a single-file key always lands in the same id: the stacks are
matched in both conventions by the layouts' own count patterns, and the input / output
modules of both conventions are named above.

Keys may carry the `model.diffusion_model.` prefix (ComfyUI checkpoints, some single
files); in a file that has it, only the keys under it are the diffusion model's. Files of
the Cosmos design (Anima) hold the whole model in one module, `net.`: the root modules
above are its children there. Count names that are none of the above (Anima's
`adapter_blocks`, the text adapter's own blocks) make no ids: their keys are `IN`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from sdkit.arch.families import FAMILIES
from sdkit.arch.families.spec import Family

IN = "IN"
OUT = "OUT"
DENOISER_PREFIX = "model.diffusion_model."

# count name (DenoiserLayout.counts) -> the id letter of its stack, or the side it belongs to
_STACK_LETTERS = {"double_blocks": "D", "single_blocks": "S", "depth": "B", "blocks": "B", "layers": "B"}
_INPUT_SIDE_COUNTS = ("refiner_layers", "approximator_layers")
_OUTPUT_SIDE_COUNTS = ("nerf_blocks",)
# root modules after the last block, in every family and convention
OUTPUT_MODULES = ("final_layer", "all_final_layer", "norm_out", "proj_out", "head", "norm_final",
                  "nerf_image_embedder", "nerf_final_layer", "nerf_final_layer_conv")
_ROOT_OUTPUT_TENSORS = ("scale_shift_table",)  # a root tensor, not a module: only the bare name
# the module that holds the whole model in files of the Cosmos design (Anima's `net.`):
# its children are the root modules above
_MODEL_ROOTS = ("net.",)


def _module_path(relative: str) -> str:
    """A key below the denoiser root without the model's own holder (`net.final_layer.…`
    -> `final_layer.…`)."""
    return next((relative[len(root):] for root in _MODEL_ROOTS if relative.startswith(root)), relative)


@dataclass(frozen=True)
class Stack:
    """One numbered block list of a family: its id letter and its names in each convention."""

    count: str  # the count name in the family's layouts ("double_blocks")
    letter: str  # "D"
    patterns: tuple[str, ...]  # the layouts' regexes, one group: the block index
    names: tuple[str, ...]  # the list's key prefix in each convention ("double_blocks", "transformer_blocks")

    def index_of(self, relative: str) -> int | None:
        for pattern in self.patterns:
            if match := re.match(pattern, relative):
                return int(match.group(1))
        return None


@dataclass(frozen=True)
class TransformerScheme:
    """How one family's denoiser keys fall into merge blocks."""

    family: str
    stacks: tuple[Stack, ...]
    side_patterns: Mapping[str, tuple[str, ...]]  # IN / OUT -> count patterns of that side
    input_modules: Mapping[str, tuple[str, ...]]  # convention -> root modules its layout names

    def block_of(self, relative: str) -> str:
        """The id of a key relative to the denoiser root (`double_blocks.3.img_attn.qkv.weight`)."""
        for stack in self.stacks:
            index = stack.index_of(relative)
            if index is not None:
                return f"{stack.letter}{index:02d}"
        for side, patterns in self.side_patterns.items():
            if any(re.match(pattern, relative) for pattern in patterns):
                return side
        path = _module_path(relative)
        if path.split(".", 1)[0] in OUTPUT_MODULES or path in _ROOT_OUTPUT_TENSORS:
            return OUT
        return IN

    def stack_index(self, relative: str) -> tuple[Stack, int] | None:
        for stack in self.stacks:
            index = stack.index_of(relative)
            if index is not None:
                return stack, index
        return None


def _list_name(pattern: str) -> str:
    """`double_blocks\\.(\\d+)\\.` -> `double_blocks` (the key prefix before the index)."""
    return pattern.split(r"\.(\d+)", 1)[0].replace("\\", "")


def transformer_scheme(family: Family) -> TransformerScheme:
    """The merge blocks of a transformer family, from the counts of its layouts."""
    patterns: dict[str, list[str]] = {}
    for layout in family.layouts:
        for count, pattern in layout.counts.items():
            patterns.setdefault(count, [])
            if pattern not in patterns[count]:
                patterns[count].append(pattern)
    stacks = tuple(Stack(count, _STACK_LETTERS[count], tuple(found),
                         tuple(dict.fromkeys(_list_name(p) for p in found)))
                   for count, found in patterns.items() if count in _STACK_LETTERS)
    sides = {IN: tuple(p for count in _INPUT_SIDE_COUNTS for p in patterns.get(count, ())),
             OUT: tuple(p for count in _OUTPUT_SIDE_COUNTS for p in patterns.get(count, ()))}
    scheme = TransformerScheme(family.name, stacks, sides, {})
    return replace(scheme, input_modules=_input_modules(family, scheme))


def _input_modules(family: Family, scheme: TransformerScheme) -> dict[str, tuple[str, ...]]:
    """Per convention, the root modules the layouts name that fall in `IN` (for listings)."""
    lists = {_list_name(pattern) for layout in family.layouts for pattern in layout.counts.values()}
    found: dict[str, list[str]] = {}
    for layout in family.layouts:
        for key in (*layout.shapes, *layout.optional_shapes, *layout.flags.values(), *layout.markers):
            root = _module_path(key).split(".", 1)[0]
            if root.startswith("_") or root in lists or scheme.block_of(key) != IN:
                continue
            names = found.setdefault(layout.convention, [])
            if root not in names:
                names.append(root)
    return {convention: tuple(names) for convention, names in found.items()}


def is_transformer_family(name: str | None) -> bool:
    family = FAMILIES.get(name or "")
    return bool(family and family.layouts)


@dataclass(frozen=True)
class TransformerBlocks:
    """The block ids of one transformer model: `IN`, its stacks, `OUT`."""

    scheme: TransformerScheme
    counts: tuple[int, ...]  # blocks per stack, in the scheme's order
    sides: tuple[str, ...] = (IN, OUT)  # the sides that hold keys
    prefix: str = ""  # DENOISER_PREFIX when the file's diffusion model sits under it
    names: frozenset[str] = field(default=frozenset(), compare=False)  # relative key names

    @property
    def ids(self) -> tuple[str, ...]:
        stacked = (f"{stack.letter}{i:02d}" for stack, count in zip(self.scheme.stacks, self.counts)
                   for i in range(count))
        return (*((IN,) if IN in self.sides else ()), *stacked, *((OUT,) if OUT in self.sides else ()))

    def describe(self) -> str:
        """Compact id list for messages: `IN, D00–D18, S00–S37, OUT`."""
        parts = [IN] if IN in self.sides else []
        for stack, count in zip(self.scheme.stacks, self.counts):
            if count:
                parts.append(f"{stack.letter}00–{stack.letter}{count - 1:02d}" if count > 1 else f"{stack.letter}00")
        if OUT in self.sides:
            parts.append(OUT)
        return ", ".join(parts)

    @property
    def aliases(self) -> dict[str, str]:
        """Other spellings of ids: the stacks' key prefixes in either convention, as
        ComfyUI's per-block merge nodes name them (`double_blocks.3.` → D03)."""
        aliases = {}
        for stack, count in zip(self.scheme.stacks, self.counts):
            for name in stack.names:
                for i in range(count):
                    aliases[f"{name}.{i}"] = aliases[f"{name}.{i}."] = f"{stack.letter}{i:02d}"
        return aliases

    def relative(self, key: str) -> str:
        return key[len(self.prefix):] if self.prefix and key.startswith(self.prefix) else key

    def component_of(self, key: str) -> str:
        """"unet" (the diffusion model, whatever its design) for the denoiser's keys."""
        if not self.prefix or key.startswith(self.prefix):
            return "unet"
        from sdkit.arch.blocks import component_of

        return component_of(key)

    def block_of(self, key: str) -> str | None:
        if self.component_of(key) != "unet":
            return None
        return self.scheme.block_of(self.relative(key))

    def covers(self, block: str) -> str:
        """What an id holds, in the key names of both conventions (for listings)."""
        if block == OUT:
            return "the layers after the last block, whichever the file has: " + ", ".join(
                (*OUTPUT_MODULES, *_ROOT_OUTPUT_TENSORS))
        if block == IN:
            named = [f"{', '.join(names)} ({convention})"
                     for convention, names in self.scheme.input_modules.items()]
            return "embedders and shared conditioning: " + "; ".join(named) + "; any key outside the blocks"
        stack = next(s for s in self.scheme.stacks if block.startswith(s.letter))
        index = int(block[len(stack.letter):])
        return " / ".join(f"{name}.{index}." for name in stack.names)


def transformer_blocks(family: str, keys: Iterable[str]) -> TransformerBlocks:
    """The block ids of a model of a transformer `family` whose keys are `keys` (the
    numbers of blocks taken from the keys, as for a UNet)."""
    scheme = transformer_scheme(FAMILIES[family])
    keys = list(keys)
    prefix = DENOISER_PREFIX if any(key.startswith(DENOISER_PREFIX) for key in keys) else ""
    relative = [key[len(prefix):] for key in keys if key.startswith(prefix)]
    highest = [-1] * len(scheme.stacks)
    sides: set[str] = set()
    for name in relative:
        found = scheme.stack_index(name)
        if found is None:
            sides.add(scheme.block_of(name))
            continue
        position = scheme.stacks.index(found[0])
        highest[position] = max(highest[position], found[1])
    return TransformerBlocks(scheme, tuple(h + 1 for h in highest),
                             tuple(side for side in (IN, OUT) if side in sides), prefix, frozenset(relative))


def released_transformer_blocks(family: str) -> list[tuple[list[str], TransformerBlocks]]:
    """The block ids of each released size of a family, with the releases of that size."""
    ref = FAMILIES[family]
    scheme = transformer_scheme(ref)
    sizes: dict[tuple[int, ...], list[str]] = {}
    for release in ref.releases:
        counts = tuple(release.dims.get(stack.count, 0) for stack in scheme.stacks)
        sizes.setdefault(counts, []).append(release.name)
    return [(names, TransformerBlocks(scheme, counts)) for counts, names in sizes.items()]
