"""LoRA module names of transformer denoisers (FLUX.1 / FLUX.2, Chroma, SD3.x, Z-Image,
Qwen-Image, Wan, HiDream, Lumina 2) in the layouts their loaders read, and the layers
behind them, known with or without a base model.

Three layouts:

- `kohya` (sd-scripts `networks/lora_flux.py`, `lora_sd3.py`): `lora_unet_<single-file
  path, dots as underscores>`, `lora_down.weight` / `lora_up.weight` / `alpha`; text
  encoders `lora_te1_` (CLIP-L), `lora_te2_` (CLIP-G), `lora_te3_` (T5-XXL) with their
  Hugging Face paths;
- `comfyui`: `diffusion_model.<single-file path>` with the same tensors, the generic name
  ComfyUI's `model_lora_keys_unet` gives every weight of any model; text encoders keep
  kohya's names, which `model_lora_keys_clip` maps;
- `diffusers`: peft names `transformer.<diffusers path>.lora_A.weight` / `lora_B.weight`
  (`text_encoder.<path>` …), as `save_lora_weights` writes them.

A layer is found by its place in the family's key map (`sdkit.arch.families.*.KEY_MAP`,
as `Link`s): names of either convention reach it, whatever prefix a trainer put before
them (`lora_transformer_`, `lycoris_`, `base_model.model.`, …; compared as underscore
paths, as `sdkit.adapters.lora_names` does). Where the conventions cut a layer
differently the factors are rebuilt, exactly:

- q, k, v (and FLUX's MLP input) kept apart → one fused module: the down factors
  stacked, the up factor block-diagonal (rank = the sum of the parts' ranks);
- a fused module → its parts: the up factor cut by rows, the down factor shared; rank
  columns whose up rows are all zero in a part are dropped (a block-diagonal up gives the
  parts back with their own ranks);
- a final modulation stored (shift, scale) in one convention and (scale, shift) in the
  other: the up rows' halves exchanged.

Without a base the sizes a fused tensor is cut by (`hidden`, Lumina 2's `kv`) are
measured from the LoRA's own factors on layers whose shapes the family's layouts name,
and the block counts from its names (or from a release of those sizes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from sdkit.arch.families.spec import Family, KeyMap, size_terms
from sdkit.arch.fingerprint import bind_sizes
from sdkit.arch.keymaps.transformer import transformer_links
from sdkit.errors import SdkitError

LAYOUTS = ("comfyui", "kohya", "diffusers")
KOHYA_UNET = "lora_unet_"
COMFYUI_UNET = "diffusion_model."
PEFT_UNET = "transformer."
# prefixes trainers put before a denoiser module path (longest first where they nest)
_UNET_PREFIXES = ("base_model.model.transformer.", "base_model.model.diffusion_model.", "model.diffusion_model.",
                  "diffusion_model.", "transformer.", "lora_transformer_", "lora_unet_", "lycoris_",
                  "base_model.model.", "unet.")
_WEIGHT = ".weight"
# text encoders: kohya prefix per encoder kind, and how an underscore path gets its dots back
_KOHYA_TEXT = {"clip": "lora_te1_", "openclip": "lora_te2_", "t5": "lora_te3_"}
_TEXT_DOTS = {
    "clip": (re.compile(r"^(?:text_model_)?encoder_layers_(\d+)_(self_attn|mlp)_(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$"),
             r"text_model.encoder.layers.\1.\2.\3"),
    "t5": (re.compile(r"^encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(q|k|v|o|wi_0|wi_1|wi|wo)$"),
           r"encoder.block.\1.layer.\2.\3.\4"),
}
_TEXT_DOTS["openclip"] = _TEXT_DOTS["clip"]  # diffusers holds CLIP-G as a CLIPTextModel too
TEXT_ARCHITECTURES = tuple(_KOHYA_TEXT)  # the text encoders kohya's names reach


@dataclass(frozen=True)
class LayerPlace:
    """One adaptable layer of a transformer: its single-file module path and its diffusers
    module path(s). `kind` is "same", "fused" (the diffusers parts stacked by rows into
    the single-file tensor) or "swap" (the two halves of the rows exchanged). `sizes`:
    the rows of each fused part (None for equal parts, or where `unknown` lists sizes the
    LoRA did not show)."""

    kind: str
    ldm: str
    parts: tuple[str, ...]
    sizes: tuple[int | None, ...] | None = None
    unknown: tuple[str, ...] = ()


@dataclass(frozen=True)
class Address:
    """Where a module name points: a layer, the convention of the name, and which
    diffusers part (None for a single-file name)."""

    place: LayerPlace
    part: int | None
    convention: str  # "ldm" | "diffusers"


@dataclass
class PlaceIndex:
    """Every layer of one transformer and the underscore paths that reach it."""

    family: Family
    places: list[LayerPlace]
    by_path: dict[str, Address | None] = field(default_factory=dict)  # None: two layers share it

    def __post_init__(self) -> None:
        for place in self.places:
            self._add(place.ldm, Address(place, None, "ldm"))
            if place.parts == (place.ldm,):  # one name in both conventions
                continue
            for index, part in enumerate(place.parts):
                self._add(part, Address(place, index, "diffusers"))

    def _add(self, path: str, address: Address) -> None:
        key = path.replace(".", "_")
        known = self.by_path.get(key, address)
        self.by_path[key] = address if known == address else None

    def find(self, path: str) -> Address | None:
        return self.by_path.get(path.replace(".", "_"))


# ---- module names ----------------------------------------------------------------------------

def denoiser_path(module_name: str) -> str | None:
    """The denoiser module path a LoRA module name holds (dots or underscores, as the
    trainer wrote it), None for a text-encoder module."""
    if text_encoder_address(module_name) is not None:
        return None
    for prefix in _UNET_PREFIXES:
        if module_name.startswith(prefix):
            return module_name[len(prefix):]
    return module_name


def text_encoder_address(module_name: str) -> tuple[str, str] | None:
    """(kohya prefix or diffusers component, path) of a text-encoder module name."""
    for prefix in ("lora_te1_", "lora_te2_", "lora_te3_", "lora_te_"):
        if module_name.startswith(prefix):
            return prefix, module_name[len(prefix):]
    for component in ("text_encoder_3.", "text_encoder_2.", "text_encoder."):
        if module_name.startswith(component):
            return component[:-1], module_name[len(component):]
    return None


def unet_name(layout: str, path: str) -> str:
    """The module name `layout` gives a denoiser layer (a single-file path for kohya and
    comfyui, a diffusers path for diffusers)."""
    if layout == "kohya":
        return KOHYA_UNET + path.replace(".", "_")
    return (COMFYUI_UNET if layout == "comfyui" else PEFT_UNET) + path


def text_name(family: Family, layout: str, module_name: str) -> str:
    """The name `layout` gives a text-encoder module of a `family` LoRA."""
    prefix, path = text_encoder_address(module_name) or ("", module_name)
    encoders = family.text_encoders
    if prefix.startswith("lora_te"):
        wanted = {"lora_te1_": "clip", "lora_te2_": "openclip", "lora_te3_": "t5"}.get(prefix)
        encoder = next((e for e in encoders if e.architecture == wanted), encoders[0] if prefix == "lora_te_" else None)
    else:
        encoder = next((e for e in encoders if e.component == prefix), None)
    if encoder is None or encoder.architecture not in _KOHYA_TEXT:
        raise SdkitError(f"{module_name}: no {family.title} text encoder takes this name "
                         "(text-encoder modules convert for CLIP-L, CLIP-G and T5-XXL)")
    if layout != "diffusers":
        return _KOHYA_TEXT[encoder.architecture] + path.replace(".", "_")
    if "." not in path:
        pattern, dotted = _TEXT_DOTS[encoder.architecture]
        if not pattern.match(path):
            raise SdkitError(f"{module_name}: not a layer of {encoder.part or encoder.component} sdkit can name in diffusers")
        path = pattern.sub(dotted, path)
    return f"{encoder.component}.{path}"


# ---- the layers of a family, with or without a base -----------------------------------------

def place_index(family: Family, dims: Mapping[str, int], measured: Iterable[str],
                paths: Iterable[str] = ()) -> PlaceIndex:
    """The layers of a `family` transformer of sizes `dims` (block counts included);
    `measured` names the sizes known for sure, `paths` the dotted module paths of a
    family whose single files use diffusers' names (they have no map to build from)."""
    key_map = family.key_map
    if key_map is None:
        raise SdkitError(f"sdkit has no single-file ⇄ diffusers key map for {family.title} yet")
    if key_map.same_names:
        return PlaceIndex(family, [LayerPlace("same", path, (path,)) for path in sorted(set(paths))])
    known = set(measured)
    needed = size_names(key_map)
    filled = {**{name: 0 for name in needed}, **dims}
    places = []
    for link in transformer_links(key_map, filled):
        if link.kind == "unused" or not all(name.endswith(_WEIGHT) for name in (*link.ldm, *link.diffusers)):
            continue
        ldm = link.ldm[0][: -len(_WEIGHT)]
        parts = tuple(name[: -len(_WEIGHT)] for name in link.diffusers)
        if link.kind == "fused":
            unknown = tuple(sorted(_place_size_names(link.arg, key_map, ldm) - known))
            places.append(LayerPlace("fused", ldm, parts, link.arg, unknown))
        else:
            places.append(LayerPlace(link.kind, ldm, parts))
    return PlaceIndex(family, places)


def size_names(key_map: KeyMap) -> set[str]:
    """The layout sizes the map's fused places are cut by (`hidden`, `kv`)."""
    names: set[str] = set()
    for place in (*key_map.places, *(p for block in key_map.blocks for p in (*block.places, *block.last))):
        for size in place.sizes:
            if isinstance(size, str):
                names.update(name for _, name in size_terms(size) if name)
    return names


def _place_size_names(sizes: tuple[int | None, ...] | None, key_map: KeyMap, ldm: str) -> set[str]:
    """The size names a fused place at `ldm` depends on (looked up by its template)."""
    if sizes is None:
        return set()
    for place in (*key_map.places, *(p for block in key_map.blocks for p in (*block.places, *block.last))):
        if place.kind == "fused" and place.sizes and (ldm == place.ldm or ldm.endswith("." + place.ldm)):
            return {name for size in place.sizes if isinstance(size, str)
                    for _, name in size_terms(size) if name}
    return set()


def block_counts(family: Family, paths: Iterable[str]) -> dict[str, int]:
    """Per block list of the family, one more than the highest block index the module
    paths name (in either convention)."""
    key_map = family.key_map
    counts: dict[str, int] = {}
    paths = [path.replace(".", "_") for path in paths]
    for block in key_map.blocks if key_map else ():
        patterns = [re.compile("^" + re.escape(template.replace(".", "_")).replace(r"\{i\}", r"(\d+)"))
                    for template in (block.ldm, block.diffusers)]
        found = [int(m.group(1)) for path in paths for pattern in patterns if (m := pattern.match(path))]
        counts[block.count] = max(counts.get(block.count, 0), max(found, default=-1) + 1)
    return counts


def measured_sizes(family: Family, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The layout sizes that the delta shapes of the LoRA's modules show (`shapes` maps
    underscore module paths to (rows, columns)), on layers the family's layouts name."""
    pairs = []
    for layout in family.layouts:
        for key, template in {**layout.shapes, **layout.optional_shapes}.items():
            if not key.endswith(_WEIGHT) or len(template) != 2:
                continue
            shape = shapes.get(key[: -len(_WEIGHT)].replace(".", "_"))
            if shape is not None:
                pairs.append((template, shape))
    bound = bind_sizes(pairs)
    if bound is None:
        raise SdkitError(f"the LoRA's layer shapes contradict each other as {family.title} sizes")
    return bound


def release_counts(family: Family, dims: Mapping[str, int]) -> dict[str, int] | None:
    """The block counts of the releases whose sizes are these (None when none is, or
    their counts differ)."""
    counts = {block.count for block in (family.key_map.blocks if family.key_map else ())}
    found = []
    for release in family.releases:
        sizes = {k: v for k, v in release.dims.items() if k not in counts}
        if sizes and all(dims.get(k) == v for k, v in sizes.items() if k in dims) \
                and any(k in dims for k in sizes):
            found.append({k: v for k, v in release.dims.items() if k in counts})
    if not found or any(other != found[0] for other in found[1:]):
        return None
    return found[0]


def last_block_places(family: Family) -> set[str]:
    """Single-file paths (of a template, no block prefix) that differ in a list's last
    block (SD3's context modulation, swapped there)."""
    key_map = family.key_map
    return {place.ldm for block in (key_map.blocks if key_map else ()) for place in block.last}
