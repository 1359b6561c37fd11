"""Adapter module names mapped onto the tensors of a base model.

The index is built model-first, as ComfyUI does: for every weight of the base's UNet and
text encoders it lists every name an adapter may give that layer and points each at the
base tensor. The names are:

- the layer's path in the base's own convention and, through the exact key maps of
  `sdkit.arch.keymaps`, its path in the other convention (kohya names SD1/SD2 UNet layers
  after diffusers paths and SDXL ones after LDM paths; both are accepted on any base);
- each in kohya's underscore spelling (lookups compare underscore spellings, so dotted
  diffusers / peft names match too); text-encoder paths with and without `text_model.`.

OpenCLIP text encoders in single files keep q, k and v fused in `in_proj_weight`; the
key map's split recipe tells which rows hold each, so a `q_proj` module targets one third
of that tensor. Adapter names are never turned back from underscores into dots: they are
only looked up. Transformer denoisers (FLUX, SD3, …) get their index from
`sdkit.adapters.transformer_names`; there a layer's delta may also be spread over several
tensors (`Target.pieces`).

A base known only by its structure (a layout and the diffusers configs at hand, as when
renaming an adapter with no base weights) gets the same index from the key maps' links,
its layers carrying paths but no tensors (`structure_names`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Generic, Mapping, Sequence, TypeVar

from sdkit.adapters.lora_format import BOFT, FULL, IA3, LOHA, LOKR, LORA, NORM, OFT, LoraFile, LoraModule
from sdkit.arch.keymaps import (LAYOUTS, KeyPlan, KeyRecipe, checkpoint_from_ldm, checkpoint_to_ldm,
                                infer_clip_config_from_ldm)
from sdkit.arch.keymaps.clip import clip_links, has_projection
from sdkit.arch.keymaps.unet import unet_links
from sdkit.errors import SdkitError
from sdkit.io.lazy import LazyTensor
from sdkit.io.model_file import FLOAT_DTYPES

ADAPTABLE = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3")
# adapter-name prefix -> component (None: a bare path, looked up in every component)
_NAME_PREFIXES: tuple[tuple[str, str | None], ...] = (
    ("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"), ("lora_te_", "text_encoder"), ("lycoris_", "unet"), ("unet.", "unet"),
    ("text_encoder_2.", "text_encoder_2"), ("text_encoder_3.", "text_encoder_3"), ("text_encoder.", "text_encoder"),
    ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"),
    # transformer denoisers (ComfyUI `model_lora_keys_unet`): diffusers / peft `transformer.`,
    # OneTrainer `lora_transformer_`, peft wrappers around either root
    ("lora_transformer_", "unet"), ("transformer.", "unet"), ("base_model.model.transformer.", "unet"),
    ("base_model.model.diffusion_model.", "unet"), ("base_model.model.", None),
)
_PEFT_WRAPPER = "base_model.model."
_TEXT_WRAP = "text_model_"


@dataclass(frozen=True)
class TensorRef:
    """A base tensor, or the rows `rows[0]:rows[1]` of it (one third of a fused q|k|v)."""

    key: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class Piece:
    """Rows `delta_rows` of a layer's delta, added to `weight` (a tensor, or rows of it);
    the same rows of a bias delta go to `bias`."""

    weight: TensorRef
    delta_rows: tuple[int, int]
    bias: TensorRef | None = None

    @property
    def rows(self) -> int:
        return self.delta_rows[1] - self.delta_rows[0]


@dataclass
class Layer:
    """An adaptable layer of a base model, by its module paths inside its component."""

    component: str  # unet | text_encoder | text_encoder_2
    diffusers_path: str | None = None  # diffusers / transformers names
    ldm_path: str | None = None  # LDM names


@dataclass(kw_only=True)
class Target(Layer):
    """An adaptable layer of a loaded base: where its weight (and bias) live."""

    weight: TensorRef
    shape: tuple[int, ...]  # the weight's shape (of its rows, for a fused third)
    dtype: str
    bias: TensorRef | None = None
    ldm_key: str | None = None  # the weight's LDM checkpoint key (block ids come from it)
    # where the delta goes when not all of it into `weight`: cut by rows over several
    # tensors (a fused q|k|v module on a base that keeps q, k and v apart) or with its two
    # halves exchanged (a modulation stored in the other order); `weight` is then the first
    pieces: tuple[Piece, ...] = ()

    @property
    def path(self) -> str:
        return self.diffusers_path or self.ldm_path or self.weight.key

    def placements(self) -> tuple[Piece, ...]:
        """Every (tensor, rows of the delta) this layer's delta is added to."""
        return self.pieces or (Piece(self.weight, (0, self.shape[0]), self.bias),)


LayerT = TypeVar("LayerT", bound=Layer)


@dataclass
class ModelNames(Generic[LayerT]):
    """Every adaptable layer of a model and the names that reach it."""

    targets: list[LayerT]
    names: dict[tuple[str, str], LayerT | None]  # (component, underscore path); None: ambiguous
    notes: list[str] = field(default_factory=list)

    def components(self) -> list[str]:
        return [c for c in ADAPTABLE if any(t.component == c for t in self.targets)]

    def resolve(self, module_name: str) -> tuple[LayerT | None, str | None]:
        """(target, None) or (None, why the name reaches no layer of this model)."""
        component, path = adapter_address(module_name)
        candidates = [component] if component else list(ADAPTABLE)
        found: list[LayerT] = []
        for candidate in candidates:
            key = (candidate, path)
            if key in self.names:
                target = self.names[key]
                if target is None:
                    return None, f"{candidate} has several layers named {path}"
                found.append(target)
        if len(found) > 1:
            return None, "matches layers of " + " and ".join(t.component for t in found)
        if found:
            return found[0], None
        if component and component not in self.components():
            return None, f"the base has no {component}"
        return None, f"no layer {path} in the base's {component or 'model'}"


def adapter_address(module_name: str) -> tuple[str | None, str]:
    """(component, underscore path) an adapter module name refers to; the component is
    None for bare peft paths, which are looked up in every component."""
    component: str | None = None
    rest = module_name
    for prefix, named in _NAME_PREFIXES:
        if module_name.startswith(prefix):
            component, rest = named, module_name[len(prefix):]
            break
    rest = rest.removeprefix(_PEFT_WRAPPER)
    if ".processor." in rest:  # old diffusers attention processors: attn1.processor.to_q
        rest = rest.replace(".processor.", ".")
        rest = rest + ".0" if rest.endswith(".to_out") else rest
    return component, rest.replace(".", "_")


def underscore_names(target: Layer) -> set[str]:
    """The underscore spellings that reach `target`."""
    names = {p.replace(".", "_") for p in (target.diffusers_path, target.ldm_path) if p}
    if target.component != "unet" and target.diffusers_path:
        plain = target.diffusers_path.replace(".", "_")
        names.add(plain.removeprefix(_TEXT_WRAP) if plain.startswith(_TEXT_WRAP) else _TEXT_WRAP + plain)
    return names


def index_names(targets: Sequence[LayerT], notes: list[str]) -> ModelNames[LayerT]:
    names: dict[tuple[str, str], LayerT | None] = {}
    for target in targets:
        for name in underscore_names(target):
            key = (target.component, name)
            if key in names and names[key] is not target:
                names[key] = None
            else:
                names[key] = target
    return ModelNames(list(targets), names, notes)


# ---- building the index from a model's tensors -----------------------------------------

def model_names(convention: str, layout: str, tensors: Mapping[str, LazyTensor],
                configs: Mapping[str, dict] | None = None) -> ModelNames[Target]:
    """The index of a model whose `tensors` are named as a checkpoint of `layout` in
    `convention` ("ldm" keys, or diffusers `<component>/<key>`); `configs` are the
    diffusers component configs known (needed to name a diffusers model's layers in LDM)."""
    builder = _TargetBuilder(convention, layout)
    own = {name: lazy for name, lazy in tensors.items() if builder.locate(name)[0] in ADAPTABLE}
    builder.add_own(own)
    notes: list[str] = []
    try:
        if convention == "ldm":
            builder.add_diffusers_names(_ldm_to_diffusers(layout, own), own)
        else:
            builder.add_ldm_names(checkpoint_to_ldm(own, dict(configs or {}), layout).plan)
    except SdkitError as exc:  # names in the base's own convention still work
        notes.append(f"layer names of the other convention unavailable: {exc}")
    return index_names(builder.targets(), notes)


def _ldm_to_diffusers(layout: str, tensors: Mapping[str, LazyTensor]) -> KeyPlan:
    shapes = {name: lazy.shape for name, lazy in tensors.items()}
    configs = {}
    for part in LAYOUTS[layout]:
        if part.kind == "openclip" and any(name.startswith(part.prefix) for name in shapes):
            # every layer gets a diffusers name (SD2's diffusers encoder stops one early)
            config = infer_clip_config_from_ldm(shapes, part.prefix)
            configs[part.component] = {**config, "architectures": ["CLIPTextModel"]} \
                if layout == "sd2" else config
    return checkpoint_from_ldm(shapes, configs, layout).plan


def _module_and_role(key: str) -> tuple[str, str] | None:
    for suffix, role in ((".weight", "weight"), (".bias", "bias"),
                         ("_weight", "weight"), ("_bias", "bias")):  # OpenCLIP in_proj_weight
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


class _TargetBuilder:
    def __init__(self, convention: str, layout: str) -> None:
        self.convention = convention
        self.parts = LAYOUTS[layout]
        self.by_place: dict[tuple[str, tuple[int, int] | None], Target] = {}
        self.biases: dict[tuple[str, str], TensorRef] = {}  # (component, own path) -> bias

    def locate(self, name: str) -> tuple[str, str]:
        """(component, key inside it) of a tensor name of the model's own convention."""
        if self.convention == "diffusers":
            component, _, inner = name.partition("/")
            return component, inner
        return self.locate_ldm(name)

    def locate_ldm(self, name: str) -> tuple[str, str]:
        for part in self.parts:
            if name.startswith(part.prefix):
                return part.component, name[len(part.prefix):]
        return "", name

    def add_own(self, tensors: Mapping[str, LazyTensor]) -> None:
        for name, lazy in tensors.items():
            component, inner = self.locate(name)
            split = _module_and_role(inner)
            if split is None or lazy.dtype not in FLOAT_DTYPES:
                continue
            path, role = split
            if role == "bias":
                self.biases[(component, path)] = TensorRef(name)
            elif len(lazy.shape) >= 1:
                own = {"diffusers_path": path} if self.convention == "diffusers" else \
                    {"ldm_path": path, "ldm_key": name}
                self.by_place[(name, None)] = Target(component, weight=TensorRef(name), shape=lazy.shape,
                                                     dtype=lazy.dtype, **own)
        for target in self.by_place.values():
            target.bias = self.biases.get((target.component, target.path))

    def add_diffusers_names(self, plan: KeyPlan, tensors: Mapping[str, LazyTensor]) -> None:
        """Diffusers names for an LDM model, fused OpenCLIP thirds included."""
        alias_biases: dict[tuple[str, str], TensorRef] = {}
        for name, recipe in plan.items():
            ref = _source_ref(recipe, tensors)
            component, _, inner = name.partition("/")
            split = _module_and_role(inner)
            if ref is None or split is None:
                continue
            path, role = split
            if role == "bias":
                alias_biases[(component, path)] = ref
                continue
            target = self.by_place.get((ref.key, ref.rows))
            if target is None and ref.rows is not None:
                lazy = tensors[ref.key]
                target = Target(component, weight=ref, shape=(ref.rows[1] - ref.rows[0], *lazy.shape[1:]),
                                dtype=lazy.dtype, ldm_key=ref.key)
                self.by_place[(ref.key, ref.rows)] = target
            if target is not None:
                target.diffusers_path = path
        for target in self.by_place.values():
            if target.weight.rows is not None and target.diffusers_path:
                target.bias = alias_biases.get((target.component, target.diffusers_path))

    def add_ldm_names(self, plan: KeyPlan) -> None:
        """LDM names for a diffusers model (fused OpenCLIP tensors have no single layer)."""
        for name, recipe in plan.items():
            if recipe.kind not in ("copy", "reshape") or len(recipe.sources) != 1:
                continue
            target = self.by_place.get((recipe.sources[0], None))
            split = _module_and_role(self.locate_ldm(name)[1])
            if target is not None and split is not None and split[1] == "weight":
                target.ldm_path, target.ldm_key = split[0], name

    def targets(self) -> list[Target]:
        return list(self.by_place.values())


def _source_ref(recipe: KeyRecipe, tensors: Mapping[str, LazyTensor]) -> TensorRef | None:
    """The base tensor (or rows of it) a diffusers-side key is read from."""
    if recipe.kind in ("copy", "reshape") and len(recipe.sources) == 1:
        return TensorRef(recipe.sources[0])
    if recipe.kind == "split":
        index, parts = recipe.arg
        rows = tensors[recipe.sources[0]].shape[0] // parts
        return TensorRef(recipe.sources[0], (index * rows, (index + 1) * rows))
    return None


# ---- building the index from a model's structure ---------------------------------------

# the released families' structure: what the key maps read from a config
_SDXL_UNET = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
              "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
              "addition_embed_type": "text_time"}
_REFINER_UNET = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 "block_out_channels": [384, 768, 1536, 1536], "transformer_layers_per_block": 4,
                 "addition_embed_type": "text_time"}
_CLIP_L = {"num_hidden_layers": 12, "architectures": ["CLIPTextModel"]}
_BIG_G = {"num_hidden_layers": 32, "architectures": ["CLIPTextModelWithProjection"]}
REFERENCE_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd1": {"unet": {}, "text_encoder": _CLIP_L},  # UNet2DConditionModel's defaults are SD1's
    "sd2": {"unet": {}, "text_encoder": {"num_hidden_layers": 23, "architectures": ["CLIPTextModel"]}},
    "sdxl": {"unet": _SDXL_UNET, "text_encoder": _CLIP_L, "text_encoder_2": _BIG_G},
    "sdxl_refiner": {"unet": _REFINER_UNET, "text_encoder_2": _BIG_G},
}


def structure_names(layout: str, configs: Mapping[str, Mapping[str, Any]] | None = None) -> ModelNames[Layer]:
    """The index of a base known by its structure alone: `layout` (a key of
    `REFERENCE_CONFIGS`) and the diffusers component configs given (the others are the
    released family's). Its layers have paths and no tensors."""
    if layout not in REFERENCE_CONFIGS:
        raise SdkitError(f"LoRA names: no module index for layout {layout!r}")
    chosen = {**REFERENCE_CONFIGS[layout],
              **{name: dict(config) for name, config in (configs or {}).items() if name in REFERENCE_CONFIGS[layout]}}
    layers = []
    for link in unet_links(chosen["unet"]):
        diffusers, ldm = _module_path(link.diffusers), _module_path(link.ldm)
        if diffusers is not None and ldm is not None:
            layers.append(Layer("unet", diffusers, ldm))
    for component in ("text_encoder", "text_encoder_2"):
        config = chosen.get(component)
        if config is None:
            continue
        # adapters name text-encoder layers by their transformers path, never the LDM one (OpenCLIP)
        for link in clip_links(config, "hf", has_projection(config)):
            path = _module_path(link.diffusers)
            if path is not None:
                layers.append(Layer(component, path))
    return index_names(layers, [])


def _module_path(keys: tuple[str, ...]) -> str | None:
    """The module path of a link's single `.weight` tensor (None for other links)."""
    return keys[0][: -len(".weight")] if len(keys) == 1 and keys[0].endswith(".weight") else None


# ---- shape checks ----------------------------------------------------------------------

def delta_extent(module: LoraModule) -> tuple[int | None, int | None]:
    """(output rows, element count) of the module's weight delta, where shapes tell:
    known before a factor is loaded or a product formed."""
    t = {role: lazy.shape for role, lazy in module.tensors.items()}
    if module.type == LORA:
        per_row = math.prod(t["down"][1:]) * (math.prod(t["mid"][2:]) if "mid" in t else 1)
        return t["up"][0], t["up"][0] * per_row
    if module.type == LOHA:
        if "t1" in t:
            return t["w1a"][1], t["w1a"][1] * t["w1b"][1] * math.prod(t["t1"][2:])
        return t["w1a"][0], t["w1a"][0] * math.prod(t["w1b"][1:])
    if module.type == LOKR:
        return _lokr_extent(t)
    if module.type in (FULL, NORM):
        stored = t.get("diff", t.get("w_norm"))
        return (stored[0], math.prod(stored)) if stored else (None, None)
    if module.type == OFT:
        blocks = t.get("blocks", t.get("rotation"))
        return blocks[0] * blocks[-1], None
    if module.type == BOFT:
        return t["blocks"][1] * t["blocks"][-1], None
    return None, None


def _lokr_extent(t: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
    a, c = t["w1"][:2] if "w1" in t else (t["w1a"][0], t["w1b"][1])
    if "w2" in t:
        b, rest = t["w2"][0], math.prod(t["w2"][1:])
    elif "t2" in t:
        b, rest = t["w2a"][1], t["w2b"][1] * math.prod(t["t2"][2:])
    else:
        b, rest = t["w2a"][0], math.prod(t["w2b"][1:])
    return a * b, a * b * c * rest


def shape_problem(module: LoraModule, target: Target, bias_shape: tuple[int, ...] | None) -> str | None:
    """Why `module` cannot apply to `target` (None when its shapes fit)."""
    shape = target.shape
    if module.type == IA3:
        axis = 1 if module.extra.get("on_input") else 0
        gains = math.prod(module.tensors["weight"].shape)
        if len(shape) < 2 or gains != shape[axis]:
            return f"IA3 has {gains} gains, the layer {list(shape)}"
        return None
    rows, count = delta_extent(module)
    if (rows is not None and rows != shape[0]) or (count is not None and count != math.prod(shape)):
        return f"adapter makes {_described(rows, count)}, the layer is {list(shape)}"
    bias = module.tensors.get("bias")
    if bias is not None and bias_shape is not None and math.prod(bias.shape) != math.prod(bias_shape):
        return f"bias delta {list(bias.shape)} does not fit the layer's bias {list(bias_shape)}"
    return None


def _described(rows: int | None, count: int | None) -> str:
    if rows and count:
        return f"{rows}x{count // rows}"
    return f"{rows} rows" if rows else f"{count} values"


# ---- mapping a whole adapter -----------------------------------------------------------

@dataclass
class ModuleMapping:
    """Which modules of one adapter reach which layers, and why the others do not."""

    mapped: dict[str, Target]
    unmapped: dict[str, str]


def map_modules(lora: LoraFile, names: ModelNames[Target], bias_shapes: Mapping[str, tuple[int, ...]]) -> ModuleMapping:
    """Resolve every module of `lora`; `bias_shapes` maps base bias keys to their shapes
    (of the whole tensor; row slices are resolved here)."""
    mapped: dict[str, Target] = {}
    unmapped: dict[str, str] = {}
    claims = _Claims(bias_shapes)
    for name, module in lora.modules.items():
        target, reason = names.resolve(name)
        if target is None:
            unmapped[name] = reason or "not found"
            continue
        problem = shape_problem(module, target, _bias_shape(target, bias_shapes))
        if problem is None:
            problem = claims.overlap(target)
        if problem is not None:
            unmapped[name] = problem
            continue
        claims.add(target, name)
        mapped[name] = target
    return ModuleMapping(mapped, unmapped)


class _Claims:
    """The rows of base tensors that mapped modules write: two modules on the same rows
    (a fused `qkv` and its `to_q` in one adapter) are one too many."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.by_key: dict[str, list[tuple[int, int, str]]] = {}

    def _spans(self, target: Target) -> list[tuple[str, int, int]]:
        spans = []
        for piece in target.placements():
            key, rows = piece.weight.key, piece.weight.rows
            shape = self.shapes.get(key) or target.shape
            spans.append((key, *(rows or (0, shape[0]))))
        return spans

    def overlap(self, target: Target) -> str | None:
        for key, start, stop in self._spans(target):
            for low, high, name in self.by_key.get(key, ()):
                if start < high and low < stop:
                    return f"the same layer as {name}"
        return None

    def add(self, target: Target, name: str) -> None:
        for key, start, stop in self._spans(target):
            self.by_key.setdefault(key, []).append((start, stop, name))


def _bias_shape(target: Target, bias_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape of the layer's bias, as the delta sees it (None where it has none)."""
    if target.pieces:
        biases = [piece.bias for piece in target.pieces]
        if any(bias is None or bias.key not in bias_shapes for bias in biases):
            return None
        return (sum(piece.rows for piece in target.pieces),)
    if target.bias is None or target.bias.key not in bias_shapes:
        return None
    if target.bias.rows is None:
        return bias_shapes[target.bias.key]
    start, stop = target.bias.rows
    return (stop - start,)


def require_some(mapping: ModuleMapping, path: str) -> None:
    """Refuse an adapter none of whose modules reach the base."""
    if mapping.mapped:
        return
    example = next(iter(mapping.unmapped.items()), ("", "no modules"))
    raise SdkitError(f"{path}: none of its {len(mapping.unmapped)} modules fits the base model "
                     f"(e.g. {example[0]}: {example[1]})")
