"""`sdkit lora convert`: a transformer LoRA (FLUX.1 / FLUX.2, Chroma, SD3.x, Z-Image,
Qwen-Image, Wan, HiDream, Lumina 2) in the layout a client loads: `comfyui`, `kohya` or
`diffusers` (see `sdkit.adapters.transformer_lora` for the names and the exact
rebuilding of fused and swapped layers).

- Factors are copied bit for bit where a layer is only renamed (kohya ⇄ comfyui, and
  every layer both conventions cut alike), alpha kept per module.
- diffusers: peft keeps no alpha in the tensors, and the readers disagree on where else
  to look (diffusers ≥ 0.35 reads `lora_adapter_metadata`, older diffusers and ComfyUI
  read nothing and use scale 1), so alpha / rank is folded into `lora_B` and the peft
  config written with `lora_alpha = r`: every reader gets the same delta.
- The family comes from the LoRA's metadata and names (the family whose key map names
  every module), from `--family`, or from `--base MODEL`, which also gives exact sizes
  and block counts and checks every module's shape against the layer.
- Refused, with the module named and nothing written: a module no layer of the family
  has, two modules on one layer, shapes that do not fit, NaN or infinite factors, and
  algorithms a rebuilt layer cannot hold exactly (`convert_rows` says which fuse and swap;
  peft takes plain LoRA and DoRA with a magnitude per output row).
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sdkit.adapters.lora_format import FULL, IA3, LORA, LoraFile, LoraModule, parse_lora, plain_lora_problem
from sdkit.adapters.lora_names import delta_extent
from sdkit.adapters.transformer_lora import (LAYOUTS, LayerPlace, PlaceIndex, block_counts, denoiser_path,
                                             last_block_places, measured_sizes, place_index, release_counts,
                                             text_name, unet_name)
from sdkit.adapters.transformer_names import find_denoiser, part_rows
from sdkit.arch import Identity, identify
from sdkit.arch.families import FAMILIES
from sdkit.arch.families.spec import Family
from sdkit.errors import SdkitError, with_article
from sdkit.io import LazyTensor, open_model, write_safetensors
from sdkit.io.model_file import FLOAT_DTYPES, dtype_code
from sdkit.io.output_path import check_output_path
from sdkit.ops.convert.lora import adapter_metadata
from sdkit.ops.lora.convert_rows import (RebuiltModule, dora_on_rows, fused_module, module_rows, swap_halves,
                                         swapped_difference, swapped_roles)
from sdkit.ops.lora.plan import decisive_family, family_problem
from sdkit.ops.recipe_meta import DIFFUSERS_IMPLEMENTATION, SpecFacts, build_metadata

if TYPE_CHECKING:
    import torch

ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_SHOWN = 3
_TARGET_CONVENTION = {"comfyui": "ldm", "kohya": "ldm", "diffusers": "diffusers"}
_KOHYA_ROLES = {"up": "lora_up.weight", "down": "lora_down.weight", "mid": "lora_mid.weight"}
_UNDERSCORED = ("lora_unet_", "lora_transformer_", "lycoris_")  # names whose dots became underscores


@dataclass(frozen=True)
class LoraConvertOptions:
    to: str  # comfyui | kohya | diffusers
    base: str | None = None  # a model of the family: its key convention, sizes and shapes
    family: str | None = None  # the family, where names and metadata leave it open


@dataclass
class LoraConvertResult:
    output: str
    family: str
    layout: str
    modules_in: int = 0
    modules_out: int = 0
    fused: int = 0  # layers whose q / k / v modules became one
    split: int = 0  # fused modules written as their parts
    swapped: int = 0  # modulations whose halves were exchanged
    tensors: int = 0
    notes: list[str] = field(default_factory=list)
    as_differences: list[str] = field(default_factory=list)  # layers only a full difference holds

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "family": self.family, "layout": self.layout,
                "modules_in": self.modules_in, "modules_out": self.modules_out, "fused": self.fused,
                "split": self.split, "swapped": self.swapped, "tensors": self.tensors,
                "as_differences": self.as_differences, "notes": self.notes}


@dataclass
class _Base:
    """A base model's denoiser: family, sizes, and its weights' shapes by module path."""

    family: Family
    dims: dict[str, int]
    convention: str
    shapes: dict[str, tuple[int, ...]]  # own-convention module path -> weight shape


# ---- the operation ---------------------------------------------------------------------------

def convert_transformer_lora(source: str | os.PathLike[str], output: str | os.PathLike[str],
                             options: LoraConvertOptions, *, overwrite: bool = False) -> LoraConvertResult:
    """Write `source` (a transformer LoRA in any trainer's layout) in `options.to`'s layout."""
    if options.to not in LAYOUTS:
        raise SdkitError(f"--to must be one of {', '.join(LAYOUTS)}, not {options.to!r}")
    output = Path(output)
    check_output_path(output, (source, options.base), force=overwrite)
    with ExitStack() as stack:
        model = stack.enter_context(open_model(str(source)))
        identity = identify(model)
        if identity.kind != "lora":
            raise SdkitError(f"{source}: is {with_article(identity.part or identity.kind)}, not a LoRA")
        lora = parse_lora(model)
        _refuse_unread_keys(lora)
        base = _open_base(options.base, stack) if options.base else None
        family = _family(lora, identity, base, options.family)
        index, counts_known = _index(family, lora, base, options.to)
        result = LoraConvertResult(str(output), family.name, options.to, modules_in=len(lora.modules))
        writer = _Writer(family, options.to, lora, result)
        for place, members in _grouped(lora, index).items():
            if base is not None:
                _check_shapes(place, members, base)
            if not counts_known and _crosses_last_block(place, members, family, options.to):
                raise SdkitError(f"{next(iter(members.values())).name}: whether this is the last block's "
                                 f"layer (stored in another order there) depends on how many blocks the "
                                 f"{family.title} model has; give --base MODEL")
            writer.add_layer(place, members)
        writer.add_text_modules()
        if result.as_differences:
            result.notes.append(f"{len(result.as_differences)} layers written as full weight differences, exact but "
                                f"as large as the layers (e.g. {result.as_differences[0]}: its modules have no "
                                "factored form on the other convention's rows)")
        metadata = _metadata(model.metadata, family, options, writer, source, output)
        result.modules_out, result.tensors = writer.modules, len(writer.tensors)
        write_safetensors(output, writer.tensors, metadata, overwrite=overwrite)
    return result


def _refuse_unread_keys(lora: LoraFile) -> None:
    if lora.unrecognised:
        key, why = next(iter(lora.unrecognised.items()))
        raise SdkitError(f"{key}: {why} ({len(lora.unrecognised)} keys not understood; nothing converted)")


def _open_base(path: str, stack: ExitStack) -> _Base:
    model = stack.enter_context(open_model(path))
    found = find_denoiser(model)
    if found is None:
        raise SdkitError(f"{path}: holds no transformer denoiser sdkit knows")
    root, match = found
    shapes = {}
    for name in model.keys():
        if name.startswith(root) and name.endswith(".weight"):
            info = model.info(name)
            if info.dtype in FLOAT_DTYPES and len(info.shape) >= 2:
                shapes[name[len(root): -len(".weight")]] = tuple(info.shape)
    return _Base(match.family, dict(match.dims), match.layout.convention, shapes)


# ---- which family, which layers --------------------------------------------------------------

def _unet_paths(lora: LoraFile) -> dict[str, str]:
    return {name: path for name in lora.modules if (path := denoiser_path(name)) is not None}


def _family(lora: LoraFile, identity: Identity, base: _Base | None, named: str | None) -> Family:
    """The family the LoRA's layers are named after: the base's, the one named, or the
    one whose layers every module name reaches (metadata deciding between several)."""
    if named is not None:
        family = FAMILIES.get(named)
        if family is None or family.key_map is None:
            mapped = sorted(name for name, f in FAMILIES.items() if f.key_map is not None)
            raise SdkitError(f"--family must be one of {', '.join(mapped)}, not {named!r}")
        if base is not None and base.family is not family:
            raise SdkitError(f"--family {named}, but the base is {base.family.name}")
        return family
    if base is not None:
        problem = family_problem(base.family.name, decisive_family(identity))
        if problem:
            raise SdkitError(f"the LoRA was {problem}")
        return base.family
    decided = FAMILIES.get(decisive_family(identity))
    if decided is not None and decided.key_map is not None:  # metadata or layer widths name it
        return decided
    return _family_by_names(lora, identity.family)


def _family_by_names(lora: LoraFile, identified: str) -> Family:
    paths = list(_unet_paths(lora).values())
    full, partial_best = [], (0, None, None)
    for family in FAMILIES.values():
        if family.key_map is None or family.key_map.same_names:
            continue
        index = place_index(family, block_counts(family, paths), ())
        missing = [path for path in paths if index.find(path) is None]
        if not missing:
            full.append(family)
        elif len(paths) - len(missing) > partial_best[0]:
            partial_best = (len(paths) - len(missing), family, missing[0])
    if not full:
        full = [f for f in FAMILIES.values() if f.key_map is not None and f.key_map.same_names
                and _names_a_layout_key(f, paths)]
    if identified in {f.name for f in full}:
        return FAMILIES[identified]
    if len(full) == 1:
        return full[0]
    if full:
        raise SdkitError(f"the LoRA's layer names fit {' and '.join(f.title for f in full)}; "
                         "give --family or --base MODEL")
    example = f" (e.g. {partial_best[2]} is no {partial_best[1].title} layer)" if partial_best[1] else ""
    raise SdkitError(f"the LoRA's layer names fit no transformer family sdkit maps{example}; "
                     "give --family or --base MODEL")


def names_a_transformer(lora: LoraFile) -> bool:
    """Whether the LoRA's names fit the layers of some transformer family (one or more)."""
    try:
        _family_by_names(lora, "unknown")
    except SdkitError as exc:
        return "fit no transformer family" not in str(exc)
    return True


def _names_a_layout_key(family: Family, paths: list[str]) -> bool:
    """Evidence for a family whose single files use diffusers' names: a module on a layer
    its layouts name."""
    underscored = {path.replace(".", "_") for path in paths}
    return any(key.endswith(".weight") and key[: -len(".weight")].replace(".", "_") in underscored
               for layout in family.layouts for key in (*layout.shapes, *layout.optional_shapes))


def _index(family: Family, lora: LoraFile, base: _Base | None, layout: str) -> tuple[PlaceIndex, bool]:
    """The family's layers and whether the block counts are known (not only guessed from
    the names)."""
    paths = list(_unet_paths(lora).values())
    if base is not None:
        return place_index(family, base.dims, base.dims, base.shapes), True
    # a family whose single files use diffusers' names has no map: its layers are the
    # LoRA's own paths, whose dots only a dotted name keeps (kohya names need none)
    dotted = [path for name, path in _unet_paths(lora).items()
              if layout == "kohya" or not name.startswith(_UNDERSCORED)]
    if family.key_map is not None and family.key_map.same_names and len(dotted) < len(paths):
        example = next(name for name in lora.modules if name.startswith(_UNDERSCORED))
        raise SdkitError(f"{example}: {family.title} layer names cannot be told apart from underscores "
                         "alone; give --base MODEL")
    sizes = measured_sizes(family, _delta_shapes(lora))
    counts = block_counts(family, paths)
    released = release_counts(family, sizes)
    known = released is not None and all(released.get(k, 0) >= v for k, v in counts.items())
    return place_index(family, {**sizes, **(released if known else counts)}, sizes, dotted), known


def _delta_shapes(lora: LoraFile) -> dict[str, tuple[int, int]]:
    shapes = {}
    for name, path in _unet_paths(lora).items():
        module = lora.modules[name]
        if module.type == LORA and len(module.tensors["down"].shape) == 2:
            shapes[path.replace(".", "_")] = (module.tensors["up"].shape[0], module.tensors["down"].shape[1])
    return shapes


def _grouped(lora: LoraFile, index: PlaceIndex) -> dict[LayerPlace, dict[int | None, LoraModule]]:
    """The LoRA's denoiser modules by layer (and diffusers part), every one accounted for."""
    groups: dict[LayerPlace, dict[int | None, LoraModule]] = {}
    conventions: dict[LayerPlace, str] = {}
    for name, path in _unet_paths(lora).items():
        address = index.find(path)
        if address is None:
            why = "names two layers" if path.replace(".", "_") in index.by_path else "is no layer"
            raise SdkitError(f"{name}: {why} of {index.family.title} (nothing converted)")
        members = groups.setdefault(address.place, {})
        if address.part in members or conventions.get(address.place, address.convention) != address.convention:
            other = members.get(address.part) or next(iter(members.values()))
            raise SdkitError(f"{name}: the same layer as {other.name}")
        members[address.part] = lora.modules[name]
        conventions[address.place] = address.convention
    return groups


def _check_shapes(place: LayerPlace, members: dict[int | None, LoraModule], base: _Base) -> None:
    """Each module's delta against the base layer (or its rows)."""
    for part, module in members.items():
        expected = _layer_shape(place, part, base)
        rows, count = delta_extent(module)
        if expected is None:
            continue
        if (rows is not None and rows != expected[0]) or (count is not None and count != math.prod(expected)):
            raise SdkitError(f"{module.name}: makes a delta of {rows} rows and {count} values, the layer is "
                             f"{list(expected)}")


def _layer_shape(place: LayerPlace, part: int | None, base: _Base) -> tuple[int, ...] | None:
    if base.convention == "ldm" or place.parts == (place.ldm,):
        whole = base.shapes.get(place.ldm)
        if whole is None or part is None or place.kind != "fused":
            return whole
        start, stop = part_rows(place.sizes, len(place.parts), whole[0])[part]
        return (stop - start, *whole[1:])
    shapes = [base.shapes.get(name) for name in place.parts]
    if any(shape is None for shape in shapes):
        return None
    if part is not None:
        return shapes[part]
    return (sum(shape[0] for shape in shapes), *shapes[0][1:])


def _crosses_last_block(place: LayerPlace, members: dict[int | None, LoraModule], family: Family,
                        layout: str) -> bool:
    """A layer of the kind a block list's last block stores in another order, converted
    to the other convention (which block is last is only a guess without a base)."""
    templates = last_block_places(family)
    if not templates or not any(place.ldm.endswith("." + template) for template in templates):
        return False
    return _TARGET_CONVENTION[layout] != _member_convention(place, members)


def _member_convention(place: LayerPlace, members: dict[int | None, LoraModule]) -> str:
    """The convention the modules on a layer are named in (single-file names have no part)."""
    return "ldm" if None in members else "diffusers"


# ---- the output tensors --------------------------------------------------------------------

class _Writer:
    """The converted LoRA's tensors (lazy where only renamed) and its per-module ranks."""

    def __init__(self, family: Family, layout: str, lora: LoraFile, result: LoraConvertResult) -> None:
        self.family = family
        self.layout = layout
        self.convention = _TARGET_CONVENTION[layout]
        self.lora = lora
        self.result = result
        self.tensors: dict[str, LazyTensor] = {}
        self.ranks: dict[str, list[tuple[str, int, float]]] = {}  # diffusers: component -> (path, r, alpha)
        # diffusers: per component, a DoRA module and a plain one (peft's config holds one use_dora)
        self.dora: dict[str, str] = {}
        self.plain: dict[str, str] = {}
        self.modules = 0

    # one layer
    def add_layer(self, place: LayerPlace, members: dict[int | None, LoraModule]) -> None:
        source = _member_convention(place, members)
        if self.convention == "ldm":
            self._add_single_file(place, members, source)
        else:
            self._add_diffusers(place, members, source)

    def _add_single_file(self, place: LayerPlace, members: dict[int | None, LoraModule], source: str) -> None:
        name = unet_name(self.layout, place.ldm)
        if place.kind == "fused" and source == "diffusers":
            self._add_fused(name, place, members)
        elif place.kind == "swap" and source == "diffusers":
            self._add_swapped(name, members[0])
        else:
            self._add_renamed(name, next(iter(members.values())))

    def _add_diffusers(self, place: LayerPlace, members: dict[int | None, LoraModule], source: str) -> None:
        if place.kind == "fused" and source == "ldm":
            self._add_split(place, members[None])
            return
        for part, module in members.items():
            path = place.parts[part or 0]
            if place.kind == "swap" and source == "ldm":
                require_peft(module)
                up = swap_halves(module.tensors["up"].load())
                magnitude = _magnitude(module)
                self._add_peft(PEFT_COMPONENT, path, module, up, module.tensors["down"].load(),
                               None if magnitude is None else swap_halves(magnitude))
                self.result.swapped += 1
            else:
                self._add_peft(PEFT_COMPONENT, path, module)

    # kohya / comfyui names
    def _add_renamed(self, name: str, module: LoraModule, replaced: dict[str, "torch.Tensor"] | None = None) -> None:
        """`module` under `name`, its factors as they are (or as `replaced`), alpha kept."""
        replaced = replaced or {}
        for role, lazy in module.tensors.items():
            if role == "bias":
                key = "diff_b"
            elif module.type == LORA:
                key = _KOHYA_ROLES[role]
            else:
                key = module.keys[role][len(module.name) + 1:]
            self._put(f"{name}.{key}", module, role, replaced.get(role), lazy)
        if module.dora_scale is not None:
            magnitude = replaced.get("dora_scale")
            if module.extra.get("dora_axis") == "out":  # peft's vector: kohya's column of row magnitudes
                magnitude = (module.dora_scale.load() if magnitude is None else magnitude).reshape(-1, 1)
            self._put(f"{name}.dora_scale", module, "dora_scale", magnitude, module.dora_scale)
        if module.type == IA3:  # the parser keeps the flag, not the tensor
            self._put(f"{name}.on_input", module, "on_input", _ia3_flag(module), None)
        alpha = _kohya_alpha(module)
        if alpha is not None:
            self._put(f"{name}.alpha", module, "alpha", _scalar(alpha), None)
        self.modules += 1

    def _add_swapped(self, name: str, module: LoraModule) -> None:
        replaced = swapped_roles(module)
        if replaced is None:  # no factor holds the exchanged rows: the difference itself
            self._put_rebuilt(name, module, RebuiltModule(swapped_difference(module), FULL))
            self.result.as_differences.append(name)
        else:
            self._add_renamed(name, module, replaced)
        self.result.swapped += 1

    def _add_fused(self, name: str, place: LayerPlace, members: dict[int | None, LoraModule]) -> None:
        """q, k, v (…) modules as one (`convert_rows.fused_module`: block-diagonal factors,
        stacked magnitudes, gains or differences); missing parts add nothing."""
        modules = list(members.values())
        rows: list[int | None] = [None] * len(place.parts)  # input gains, GLoRA: no rows of their own
        if any(module_rows(module) is not None for module in modules):
            rows = self._part_rows(place, members)
        rebuilt = fused_module(members, rows, name)
        self._put_rebuilt(name, modules[0], rebuilt)
        self.result.fused += 1
        if rebuilt.form == FULL and any(module.type != FULL for module in modules):
            self.result.as_differences.append(name)

    def _put_rebuilt(self, name: str, module: LoraModule, rebuilt: RebuiltModule) -> None:
        for suffix, tensor in rebuilt.tensors.items():
            self._put(f"{name}.{suffix}", module, suffix, tensor, None)
        self.modules += 1

    def _part_rows(self, place: LayerPlace, members: dict[int | None, LoraModule]) -> list[int]:
        """Each part's rows: the modules' own, the map's sizes for parts the LoRA lacks."""
        present = {part: rows for part, module in members.items() if (rows := module_rows(module)) is not None}
        if len(present) == len(place.parts):
            return [present[part] for part in range(len(place.parts))]
        if place.unknown:
            raise SdkitError(f"{next(iter(members.values())).name}: the parts missing from this fused layer are "
                             f"sized by {', '.join(place.unknown)}, which the LoRA does not show; give --base MODEL")
        if place.sizes is None:
            return [next(iter(present.values()))] * len(place.parts)
        if None in place.sizes:
            missing = [i for i in range(len(place.parts)) if i not in present]
            if place.sizes.index(None) in missing:
                raise SdkitError(f"{next(iter(members.values())).name}: the layer's last part is missing and "
                                 "its size unknown; give --base MODEL")
        return [present.get(part, size or 0) for part, size in enumerate(place.sizes)]

    # diffusers names
    def _add_split(self, place: LayerPlace, module: LoraModule) -> None:
        """A fused module as its parts: the up factor's rows, the shared down factor, and
        only the rank columns a part uses."""
        require_peft(module)
        up, down = module.tensors["up"].load(), module.tensors["down"].load()
        magnitude = _magnitude(module)
        if place.unknown:
            raise SdkitError(f"{module.name}: cutting this fused layer needs {', '.join(place.unknown)}, which "
                             "the LoRA's other layers do not show; give --base MODEL")
        total = up.shape[0]
        known = sum(size for size in place.sizes or () if size is not None)
        rest = place.sizes is not None and None in place.sizes
        if (place.sizes is None and total % len(place.parts)) or (rest and known >= total) \
                or (place.sizes is not None and not rest and known != total):
            raise SdkitError(f"{module.name}: its {total} rows do not make the {len(place.parts)} parts of "
                             f"{place.ldm}")
        for part, (start, stop) in zip(place.parts, part_rows(place.sizes, len(place.parts), total)):
            rows = up[start:stop]
            used = rows.abs().sum(0) != 0
            if not bool(used.any()):
                if magnitude is None:
                    continue
                used[0] = True  # DoRA renormalises a part even where its LoRA adds nothing
            self._add_peft(PEFT_COMPONENT, part, module, rows[:, used], down[used],
                           None if magnitude is None else magnitude[start:stop])
        self.result.split += 1

    def _add_peft(self, component: str, path: str, module: LoraModule, up: "torch.Tensor | None" = None,
                  down: "torch.Tensor | None" = None, magnitude: "torch.Tensor | None" = None) -> None:
        """A peft module: lora_A = down as it is, lora_B = up with alpha / rank folded in
        (and a DoRA magnitude per output row: `magnitude`, else the module's own)."""
        require_peft(module)
        name = f"{component}.{path}"
        scale = module.scale
        self._put(f"{name}.lora_A.weight", module, "down", down, module.tensors["down"])
        if scale == 1 and up is None:
            self._put(f"{name}.lora_B.weight", module, "up", None, module.tensors["up"])
        else:
            up = module.tensors["up"].load() if up is None else up
            self._put(f"{name}.lora_B.weight", module, "up", (up.float() * scale).to(up.dtype), None)
        if module.dora_scale is not None:
            magnitude = _magnitude(module) if magnitude is None else magnitude
            self._put(f"{name}.lora_magnitude_vector", module, "dora_scale", magnitude.contiguous(), None)
            self.dora.setdefault(component, module.name)
        else:
            self.plain.setdefault(component, module.name)
        rank = (down if down is not None else module.tensors["down"]).shape[0]
        self.ranks.setdefault(component, []).append((path, int(rank), float(rank)))
        self.modules += 1

    def add_text_modules(self) -> None:
        """The LoRA's text-encoder modules, in the layout's names."""
        for name, module in self.lora.modules.items():
            if denoiser_path(name) is None:
                self._add_text_module(module)

    def _add_text_module(self, module: LoraModule) -> None:
        name = text_name(self.family, self.layout, module.name)
        if self.convention == "ldm":
            self._add_renamed(name, module)
        else:
            component, _, path = name.partition(".")
            self._add_peft(component, path, module)

    def _put(self, key: str, module: LoraModule, role: str, value: "torch.Tensor | None",
             lazy: LazyTensor | None) -> None:
        if key in self.tensors:
            raise SdkitError(f"{module.name}: another module is written as {key.rsplit('.', 2)[0]} too")
        if value is not None:
            _require_finite(module, role, value)
            tensor = value.contiguous()
            self.tensors[key] = LazyTensor(dtype_code(tensor.dtype), tuple(tensor.shape), lambda: tensor)
        else:
            self.tensors[key] = LazyTensor(lazy.dtype, lazy.shape, partial(_checked, module, role, lazy.load))


PEFT_COMPONENT = "transformer"


def require_peft(module: LoraModule) -> None:
    """Refuse what peft's LoRA cannot hold: all but plain LoRA and DoRA with a magnitude
    per output row (peft renormalises output rows)."""
    if module.dora_scale is not None and module.type == LORA and _magnitude(module) is None:
        raise SdkitError(f"{module.name}: its DoRA norm runs over input columns; peft's DoRA (the diffusers "
                         "layout) takes it over output rows")
    if module.dora_scale is None or module.type != LORA or "bias" in module.tensors:
        require_plain(module, "the diffusers layout")


def _magnitude(module: LoraModule) -> "torch.Tensor | None":
    """A DoRA module's magnitude per output row, as one vector (None: per input column)."""
    if module.dora_scale is None or not dora_on_rows(module):
        return None
    return module.dora_scale.load().flatten()


def require_plain(module: LoraModule, where: str) -> None:
    """Refuse what only a plain LoRA module can be rebuilt into."""
    problem = plain_lora_problem(module, convs=False)
    if problem:
        raise SdkitError(f"{module.name}: {problem}; {where} takes plain LoRA modules only")


def _kohya_alpha(module: LoraModule) -> float | None:
    """The alpha giving the module's own scale under kohya's alpha / rank."""
    if module.rank is None:
        return module.alpha
    if module.alpha is not None and module.alpha != 0 and "scale" not in module.extra \
            and not module.extra.get("rs_lora"):
        return module.alpha
    return module.scale * module.rank


def _ia3_flag(module: LoraModule) -> "torch.Tensor":
    import torch

    return torch.tensor(int(bool(module.extra.get("on_input"))))


def _scalar(value: float) -> "torch.Tensor":
    import torch

    return torch.tensor(float(value), dtype=torch.float32)


def _require_finite(module: LoraModule, role: str, tensor: "torch.Tensor") -> None:
    import torch

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise SdkitError(f"{module.name}: its {role} factor holds NaN or infinite values (nothing converted)")


def _checked(module: LoraModule, role: str, load: Callable[[], "torch.Tensor"]) -> "torch.Tensor":
    tensor = load()
    _require_finite(module, role, tensor)
    return tensor


def _metadata(metadata: dict[str, str], family: Family, options: LoraConvertOptions, writer: _Writer,
              source: str | os.PathLike[str], output: Path) -> dict[str, str]:
    """The input's metadata (ss_*, modelspec, …) with the peft config made for the new
    names (diffusers) or dropped (its alphas described names the file no longer has)."""
    carried = {k: v for k, v in (metadata or {}).items() if k != ADAPTER_METADATA_KEY}
    extra = {}
    if writer.convention == "diffusers":
        mixed = next((c for c in writer.dora if c in writer.plain), None)
        if mixed is not None:
            raise SdkitError(f"{writer.dora[mixed]}: is DoRA and {writer.plain[mixed]} is not; peft's config turns "
                             f"DoRA on or off for all of the {mixed}'s modules (nothing converted)")
        extra[ADAPTER_METADATA_KEY] = adapter_metadata(writer.ranks, set(writer.dora))
    implementation = DIFFUSERS_IMPLEMENTATION if writer.convention == "diffusers" else None
    facts = SpecFacts(family=family.name, prediction=family.prediction, adapter="lora",
                      implementation=implementation)
    params = {"to": options.to, "family": family.name, **({"base": options.base} if options.base else {})}
    inputs = [str(source)] + ([options.base] if options.base else [])
    return build_metadata("lora-convert", inputs, params, facts, extra, title=output.stem, carried=carried)


def layout_tensors(lora: LoraFile, index: PlaceIndex, layout: str
                   ) -> tuple[dict[str, LazyTensor], dict[str, list[tuple[str, int, float]]]]:
    """A LoRA on the layers of `index` in `layout`'s names: its tensors, and for diffusers
    each component's (path, rank, alpha) for the peft config."""
    family = index.family
    writer = _Writer(family, layout, lora, LoraConvertResult("", family.name, layout))
    for place, members in _grouped(lora, index).items():
        writer.add_layer(place, members)
    writer.add_text_modules()
    return writer.tensors, writer.ranks


# ---- transformer LoRAs for merge and resize ----------------------------------------------------

def transformer_base(path: str) -> bool:
    """Whether the model at `path` is (or holds) a transformer denoiser."""
    with open_model(path) as model:
        return find_denoiser(model) is not None


def in_kohya_layout(lora: LoraFile, identity: Identity, base: str | None = None) -> LoraFile:
    """A transformer LoRA in kohya's names (fused q / k / v, single-file paths), held in
    memory, so LoRAs of any trainer meet layer by layer; other LoRAs as they are. With
    `base` (a transformer model) the sizes are exact and every module's shape checked."""
    known_other = identity.family in FAMILIES and not _transformer_identity(identity)
    if base is None and (known_other or not (_transformer_identity(identity) or names_a_transformer(lora))):
        return lora
    with ExitStack() as stack:
        opened = _open_base(base, stack) if base else None
        family = _family(lora, identity, opened, None)
        _refuse_unread_keys(lora)
        index, counts_known = _index(family, lora, opened, "kohya")
        writer = _Writer(family, "kohya", lora, LoraConvertResult("", family.name, "kohya"))
        for place, members in _grouped(lora, index).items():
            if opened is not None:
                _check_shapes(place, members, opened)
            writer.add_layer(place, members)
        writer.add_text_modules()
        tensors = {key: lazy.load() for key, lazy in writer.tensors.items()}
    renamed = parse_lora(tensors, lora.metadata)
    renamed.path = lora.path
    return renamed


def _transformer_identity(identity: Identity) -> bool:
    family = FAMILIES.get(identity.family)
    return family is not None and family.key_map is not None
