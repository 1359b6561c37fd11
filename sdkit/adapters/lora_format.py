"""LoRA-family files (kohya, LyCORIS, peft/diffusers, A1111/ComfyUI dialects) read into
one representation: modules grouped by name, each with its algorithm, lazy tensors under
format-neutral roles, alpha and the rank that alpha is divided by.

Parsing reads shapes and a few scalars (`alpha`, `on_input`, `scale`) only; factor
tensors stay on disk as `sdkit.io.LazyTensor`s until loaded. The weight math is in `lora_math`.
Naming modules after a base model's keys is not done here: `LoraFile.prefix_style`
says which convention the names follow.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Mapping

from sdkit.errors import SdkitError
from sdkit.io.lazy import LazyTensor
from sdkit.io.model_file import dtype_code
from sdkit.io.safetensors_json import metadata_json

# Adapter algorithms (LoraModule.type). DyLoRA files are plain "lora".
LORA, LOHA, LOKR, IA3, GLORA, FULL, NORM, OFT, BOFT = (
    "lora", "loha", "lokr", "ia3", "glora", "full", "norm", "oft", "boft")
ALPHA_SCALED_TYPES = frozenset({LORA, LOHA, LOKR, GLORA})

# Key suffix -> (family, role). Families pick the algorithm; "common" roles can sit
# beside any of them. Roles are format-neutral: peft lora_B and kohya lora_up are "up".
_SUFFIXES: dict[str, tuple[str, str]] = {
    "lora_up.weight": (LORA, "up"), "lora_down.weight": (LORA, "down"),
    "lora_mid.weight": (LORA, "mid"),
    "lora_B.weight": (LORA, "up"), "lora_A.weight": (LORA, "down"),
    "lora.up.weight": (LORA, "up"), "lora.down.weight": (LORA, "down"),
    "lora_B": (LORA, "up"), "lora_A": (LORA, "down"),
    "lora_linear_layer.up.weight": (LORA, "up"),
    "lora_linear_layer.down.weight": (LORA, "down"),
    "lora_B.bias": ("common", "bias"),  # Flux control LoRA: a plain bias delta
    "lora_magnitude_vector": ("common", "magnitude"),  # peft's name for dora_scale
    "lora_magnitude_vector.weight": ("common", "magnitude"),
    "hada_w1_a": (LOHA, "w1a"), "hada_w1_b": (LOHA, "w1b"),
    "hada_w2_a": (LOHA, "w2a"), "hada_w2_b": (LOHA, "w2b"),
    "hada_t1": (LOHA, "t1"), "hada_t2": (LOHA, "t2"),
    "lokr_w1": (LOKR, "w1"), "lokr_w1_a": (LOKR, "w1a"), "lokr_w1_b": (LOKR, "w1b"),
    "lokr_w2": (LOKR, "w2"), "lokr_w2_a": (LOKR, "w2a"), "lokr_w2_b": (LOKR, "w2b"),
    "lokr_t2": (LOKR, "t2"),
    "a1.weight": (GLORA, "a1"), "a2.weight": (GLORA, "a2"),
    "b1.weight": (GLORA, "b1"), "b2.weight": (GLORA, "b2"), "bm.weight": (GLORA, "bm"),
    "weight": (IA3, "weight"), "on_input": (IA3, "on_input"),
    "diff": (FULL, "diff"), "diff_b": ("common", "bias"),
    "w_norm": (NORM, "w_norm"), "b_norm": (NORM, "bias"),
    "oft_blocks": (OFT, "blocks"), "oft_diag": (OFT, "rotation"), "rescale": (OFT, "rescale"),
    "alpha": ("common", "alpha"), "dora_scale": ("common", "dora_scale"),
    "scale": ("common", "scale"),
}
_SUFFIXES_LONGEST_FIRST = sorted(_SUFFIXES, key=len, reverse=True)
# Old diffusers attention-processor LoRA joins with "_": `attn1.processor.to_q_lora.up.weight`.
_UNDERSCORE_SUFFIXES = {"_lora.up.weight": "up", "_lora.down.weight": "down"}
_REQUIRED_ROLES: dict[str, tuple[tuple[str, ...], ...]] = {
    LORA: (("up",), ("down",)), LOHA: (("w1a",), ("w1b",), ("w2a",), ("w2b",)),
    LOKR: (("w1", "w1a"), ("w2", "w2a")), GLORA: (("a1",), ("a2",), ("b1",), ("b2",)),
    IA3: (("weight",), ("on_input",)), FULL: (("diff", "bias"),), NORM: (("w_norm", "bias"),),
    OFT: (("blocks", "rotation"),),
}
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_",
                   "lora_transformer_", "oft_unet_")
_DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")


@dataclass
class LoraModule:
    """One adapted layer.

    - `tensors` maps roles to lazy tensors. Roles per type: lora `up, down[, mid]`;
      loha `w1a, w1b, w2a, w2b[, t1, t2]`; lokr `w1 | w1a+w1b, w2 | w2a+w2b[, t2]`;
      glora `a1, a2, b1, b2[, bm]`; ia3 `weight`; full `diff`; norm `w_norm`;
      oft/boft `blocks` (skew generators) or `rotation` (oft only, stored rotations)
      `[, rescale]`; any type may add `bias` (a bias delta).
    - `alpha`: the stored (or configured) alpha, None when there is none.
    - `rank`: what alpha is divided by; None where the format applies no alpha
      scaling (LoKr with two full factors, IA3, full, norm, OFT).
    - `extra`: `on_input` (ia3), `rs_lora` (divide by sqrt(rank)), `scale` (an explicit
      scale key, wins over alpha/rank), `oft_constraint` ("lycoris" | "kohya"),
      `glora_layout` ("new" | "old" | None = decided with the base weight's shape),
      `dora_axis` ("out" for peft magnitude vectors; else decided by shape).
    - `keys`: the file's key for every role, `alpha`, `scale`, `on_input` and
      `dora_scale` included (all the keys this module uses).
    """

    name: str
    type: str
    tensors: dict[str, LazyTensor]
    alpha: float | None = None
    rank: int | None = None
    dora_scale: LazyTensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """The factor on the adapter's product (before user strength)."""
        return self.scale_for_rank(self.rank)

    def scale_for_rank(self, rank: int | None) -> float:
        if "scale" in self.extra:
            return float(self.extra["scale"])
        if self.type not in ALPHA_SCALED_TYPES or self.alpha is None or rank is None:
            return 1.0
        if self.alpha == 0:  # kohya and LyCORIS read alpha 0 as "alpha = rank"
            return 1.0
        divisor = math.sqrt(rank) if self.extra.get("rs_lora") else rank
        return self.alpha / divisor


@dataclass
class LoraFile:
    """A parsed adapter file. `unrecognised` maps each key that is not used to why."""

    path: str
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    prefix_style: str  # "kohya" | "lycoris" | "diffusers" | "peft" | "flat" | "mixed"
    unrecognised: dict[str, str] = field(default_factory=dict)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for module in self.modules.values():
            counts[module.type] = counts.get(module.type, 0) + 1
        return counts


@dataclass
class _Source:
    """Uniform read access to a ModelFile or a mapping of tensors."""

    keys: list[str]
    lazy: Callable[[str], LazyTensor]
    metadata: dict[str, str]
    path: str
    skipped: dict[str, str]


def _open_source(source: Any) -> _Source:
    if hasattr(source, "info") and hasattr(source, "load"):  # a ModelFile
        def lazy_file(key: str) -> LazyTensor:
            info = source.info(key)
            return LazyTensor(info.dtype, tuple(info.shape), partial(source.load, key))

        return _Source(list(source.keys()), lazy_file, dict(source.metadata or {}),
                       str(source.path), {})
    if isinstance(source, Mapping):
        return _mapping_source(source)
    raise TypeError(f"cannot read LoRA tensors from {type(source).__name__}")


def _mapping_source(source: Mapping[str, Any]) -> _Source:
    skipped: dict[str, str] = {}
    if isinstance(source.get("state_dict"), Mapping):  # a Lightning checkpoint
        skipped = {str(k): "outside the checkpoint's state_dict" for k in source if k != "state_dict"}
        source = source["state_dict"]
    tensors = {k: v for k, v in source.items() if hasattr(v, "shape") and hasattr(v, "dtype")}
    skipped.update({str(k): "not a tensor" for k in source if k not in tensors})

    def lazy_tensor(key: str) -> LazyTensor:
        tensor = tensors[key]
        return LazyTensor(dtype_code(tensor.dtype), tuple(tensor.shape), lambda: tensor)

    return _Source(list(tensors), lazy_tensor, {}, "<memory>", skipped)


def split_key(key: str) -> tuple[str, str, str] | None:
    """`<module>.<suffix>` -> (module, family, role), or None for an unknown suffix.

    A `.default.` adapter-name level (raw peft state dicts) is ignored.
    """
    plain = key.replace(".default.", ".")
    if plain.endswith(".default"):
        plain = plain[: -len(".default")]
    for suffix, role in _UNDERSCORE_SUFFIXES.items():
        if plain.endswith(suffix) and len(plain) > len(suffix):
            return plain[: -len(suffix)], LORA, role
    for suffix in _SUFFIXES_LONGEST_FIRST:
        if plain.endswith("." + suffix) and len(plain) > len(suffix) + 1:
            family, role = _SUFFIXES[suffix]
            return plain[: -len(suffix) - 1], family, role
    return None


def parse_lora(source: Any, metadata: Mapping[str, str] | None = None, *,
               peft_config: Mapping[str, Any] | None = None,
               default_alpha: float | None = None,
               rank_override: int | None = None) -> LoraFile:
    """Group a LoRA-family state dict into modules.

    `source`: a `ModelFile` or a mapping of key -> tensor. `metadata` defaults to the
    ModelFile's. Alpha comes from the module's `alpha` key, else from the peft config
    (`peft_config`, or diffusers' `lora_adapter_metadata` in the metadata), else
    `default_alpha`; with none, the scale is 1. `rank_override` replaces the divisor of
    every alpha-scaled module (for state dicts trained with a known --rank/--alpha).
    """
    src = _open_source(source)
    meta = dict(metadata if metadata is not None else src.metadata)
    groups, unrecognised = _group_keys(src)
    configs = _peft_configs(peft_config, meta)
    oft_style = "kohya" if meta.get("ss_network_module") == "networks.oft" else None
    modules: dict[str, LoraModule] = {}
    for name, roles in groups.items():
        try:
            module = _build_module(name, roles, src)
        except _Unusable as reason:
            unrecognised.update({key: str(reason) for _, key in roles.values()})
            continue
        _apply_scaling(module, configs, default_alpha, rank_override)
        if module.type in (OFT, BOFT):
            module.extra["oft_constraint"] = oft_style or (
                "kohya" if name.startswith("oft_unet_") else "lycoris")
        modules[name] = module
    if not modules:
        sample = ", ".join(src.keys[:3]) or "no tensors"
        raise SdkitError(f"{src.path}: no LoRA/LyCORIS module found among "
                         f"{len(src.keys)} tensors ({sample})")
    unrecognised.update(src.skipped)
    return LoraFile(src.path, modules, meta, _prefix_style(modules), unrecognised)


class _Unusable(Exception):
    """A module whose keys cannot be used; the message is the reason."""


def _group_keys(src: _Source) -> tuple[dict[str, dict[str, tuple[str, str]]], dict[str, str]]:
    """module name -> {role: (family, key)}; unknown keys -> reason."""
    groups: dict[str, dict[str, tuple[str, str]]] = {}
    unrecognised: dict[str, str] = {}
    for key in src.keys:
        parts = split_key(key)
        if parts is None:
            unrecognised[key] = "unknown key suffix"
            continue
        name, family, role = parts
        roles = groups.setdefault(name, {})
        if role in roles:
            unrecognised[key] = f"duplicate {role!r} tensor (also {roles[role][1]})"
            continue
        roles[role] = (family, key)
    return groups, unrecognised


def _build_module(name: str, roles: dict[str, tuple[str, str]], src: _Source) -> LoraModule:
    families = {family for family, _ in roles.values() if family != "common"}
    if len(families) > 1:
        raise _Unusable("mixes " + " and ".join(sorted(families)) + " tensors")
    if not families and "bias" not in roles:
        raise _Unusable("no adapter weights, only " + ", ".join(sorted(roles)))
    family = families.pop() if families else FULL  # a bias difference on its own
    lazy = {role: src.lazy(key) for role, (_, key) in roles.items()}
    if family == IA3 and "on_input" not in lazy:
        raise _Unusable("a plain layer weight, not an adapter tensor (IA3 has on_input)")
    for options in _REQUIRED_ROLES[family]:
        if not any(role in lazy for role in options):
            raise _Unusable(f"{family} module without {' or '.join(options)}")
    module = LoraModule(name=name, type=family, tensors=lazy,
                        keys={role: key for role, (_, key) in roles.items()})
    if "dora_scale" in lazy and "magnitude" in lazy:
        raise _Unusable("has both dora_scale and lora_magnitude_vector")
    if "magnitude" in lazy:  # peft/diffusers DoRA: always per output channel
        module.dora_scale = lazy.pop("magnitude")
        module.extra["dora_axis"] = "out"
    else:
        module.dora_scale = lazy.pop("dora_scale", None)
    if "alpha" in lazy:
        module.alpha = _scalar(lazy.pop("alpha"), "alpha")
    if "scale" in lazy:
        module.extra["scale"] = _scalar(lazy.pop("scale"), "scale")
    _TYPE_CHECKS[family](module)
    return module


def _scalar(tensor: LazyTensor, what: str) -> float:
    if math.prod(tensor.shape) != 1:
        raise _Unusable(f"{what} should hold one number, has shape {list(tensor.shape)}")
    return float(tensor.load().float().item())


def _check_lora(module: LoraModule) -> None:
    up, down = module.tensors["up"].shape, module.tensors["down"].shape
    if len(up) < 2 or len(down) < 2 or up[1] != down[0]:
        raise _Unusable(f"up {list(up)} and down {list(down)} do not share a rank")
    mid = module.tensors.get("mid")
    if mid is not None and (len(mid.shape) < 3 or mid.shape[:2] != (down[0], down[0])):
        raise _Unusable(f"lora_mid {list(mid.shape)} does not match rank {down[0]}")
    module.rank = down[0]


def _check_loha(module: LoraModule) -> None:
    t = module.tensors
    if ("t1" in t) != ("t2" in t):
        raise _Unusable("LoHa Tucker needs both hada_t1 and hada_t2")
    ranks = {t["w1a"].shape[0 if "t1" in t else 1], t["w1b"].shape[0],
             t["w2a"].shape[0 if "t1" in t else 1], t["w2b"].shape[0]}
    if len(ranks) != 1:
        raise _Unusable(f"LoHa factors disagree on rank: {sorted(ranks)}")
    module.rank = t["w1b"].shape[0]


def _check_lokr(module: LoraModule) -> None:
    t = module.tensors
    for half in ("w1", "w2"):
        if half not in t and (f"{half}a" not in t or f"{half}b" not in t):
            raise _Unusable(f"LoKr needs lokr_{half} or both lokr_{half}_a and lokr_{half}_b")
    if "t2" in t and "w2b" not in t:
        raise _Unusable("lokr_t2 without lokr_w2_a/lokr_w2_b")
    # The factored half defines the rank (w2's when both are); two full factors: none.
    if "w2" not in t:
        module.rank = t["w2b"].shape[0]
    elif "w1" not in t:
        module.rank = t["w1b"].shape[0]


def _check_glora(module: LoraModule) -> None:
    a1, a2, b1, b2 = (module.tensors[r].shape for r in ("a1", "a2", "b1", "b2"))
    new = b2[0] == b1[1] == a1[1] == a2[0]
    old = b2[1] == b1[0] == a1[0] == a2[1]
    if not (new or old):
        raise _Unusable("GLoRA factor shapes fit neither the new nor the old layout")
    # Both fit when the layer is square; the base weight's shape decides (lora_math).
    module.extra["glora_layout"] = None if new and old else ("new" if new else "old")
    module.rank = a1[0] if module.extra["glora_layout"] == "old" else a2[0]


def _check_ia3(module: LoraModule) -> None:
    on_input = module.tensors.pop("on_input")
    module.extra["on_input"] = bool(_scalar(on_input, "on_input"))


def _check_oft(module: LoraModule) -> None:
    stored = "blocks" if "blocks" in module.tensors else "rotation"
    blocks = module.tensors[stored]
    if len(blocks.shape) == 4 and stored == "blocks":
        module.type = BOFT
    elif len(blocks.shape) != 3 or blocks.shape[-1] != blocks.shape[-2]:
        raise _Unusable(f"OFT blocks of shape {list(blocks.shape)} are not square blocks")
    if module.dora_scale is not None:
        raise _Unusable("dora_scale on an OFT module is not supported")


def _check_nothing(module: LoraModule) -> None:
    return None


_TYPE_CHECKS: dict[str, Callable[[LoraModule], None]] = {
    LORA: _check_lora, LOHA: _check_loha, LOKR: _check_lokr, GLORA: _check_glora,
    IA3: _check_ia3, OFT: _check_oft, FULL: _check_nothing, NORM: _check_nothing,
}


@dataclass
class _PeftConfig:
    prefix: str  # "" or e.g. "unet": applies to module names starting with "unet."
    config: Mapping[str, Any]

    def value(self, module_name: str, field_name: str, pattern_field: str) -> Any:
        """The module's value: the first matching pattern, else the global field."""
        local = module_name[len(self.prefix) + 1:] if self.prefix else module_name
        for pattern, value in (self.config.get(pattern_field) or {}).items():
            try:
                if re.match(rf"(.*\.)?({pattern})$", local):
                    return value
            except re.error:
                continue
        return self.config.get(field_name)


def _peft_configs(peft_config: Mapping[str, Any] | None,
                  metadata: Mapping[str, str]) -> list[_PeftConfig]:
    """peft adapter configs: the explicit one, else diffusers' metadata entry, which is
    either one config or several flattened under component prefixes (`unet.r`)."""
    config: Any = peft_config
    if config is None:
        config = metadata_json(metadata.get("lora_adapter_metadata"))
    if not isinstance(config, Mapping):
        return []
    if any(k in config for k in ("r", "lora_alpha", "alpha")):
        return [_PeftConfig("", config)]
    by_prefix: dict[str, dict[str, Any]] = {}
    for key, value in config.items():
        prefix, _, field_name = str(key).rpartition(".")
        if prefix:
            by_prefix.setdefault(prefix, {})[field_name] = value
    return [_PeftConfig(p, c) for p, c in by_prefix.items()]


def _config_for(name: str, configs: Iterable[_PeftConfig]) -> _PeftConfig | None:
    for config in configs:
        if not config.prefix or name.startswith(config.prefix + "."):
            return config
    return None


def _apply_scaling(module: LoraModule, configs: list[_PeftConfig],
                   default_alpha: float | None, rank_override: int | None) -> None:
    if module.type not in ALPHA_SCALED_TYPES:
        return
    config = _config_for(module.name, configs)
    if config is not None:
        alpha_field = "lora_alpha" if module.type in (LORA, GLORA) else "alpha"
        if module.alpha is None:
            alpha = config.value(module.name, alpha_field, "alpha_pattern")
            module.alpha = None if alpha is None else float(alpha)
        if module.rank is None:  # peft scales LoKr by alpha/r even with full factors
            rank = config.value(module.name, "r", "rank_pattern")
            module.rank = None if rank is None else int(rank)
        if config.config.get("use_rslora"):
            module.extra["rs_lora"] = True
    if module.alpha is None and default_alpha is not None:
        module.alpha = float(default_alpha)
    if rank_override is not None:
        module.rank = int(rank_override)


def _prefix_style(modules: Mapping[str, LoraModule]) -> str:
    styles = set()
    for name in modules:
        if name.startswith(_KOHYA_PREFIXES):
            styles.add("kohya")
        elif name.startswith("lycoris_"):
            styles.add("lycoris")
        elif name.startswith(_DIFFUSERS_PREFIXES):
            styles.add("diffusers")
        elif "." not in name:
            styles.add("flat")
        else:
            styles.add("peft")
    return styles.pop() if len(styles) == 1 else "mixed"


def plain_lora_problem(module: LoraModule, *, convs: bool = True) -> str | None:
    """Why `module` is not a plain LoRA (whose factors can be renamed, fused or cut): its
    type, a Tucker core, DoRA, a bias delta, or (`convs=False`) conv factors; None if plain."""
    if module.type != LORA:
        return f"is {module.type}"
    if "mid" in module.tensors:
        return "has a Tucker lora_mid"
    if module.dora_scale is not None:
        return "is DoRA"
    if "bias" in module.tensors:
        return "has a bias delta"
    if not convs and len(module.tensors["down"].shape) != 2:
        return "is a conv LoRA"
    return None
