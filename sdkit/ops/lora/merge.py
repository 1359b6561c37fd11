"""Merge LoRA files into one: `ΔW = Σ wᵢ ΔWᵢ` per layer.

- exact (no rank given): plain LoRA / LoCon modules are concatenated along the rank,
  `up = [w₁s₁up₁ | w₂s₂up₂ | …]`, `down = [down₁; down₂; …]`, alpha = Σ rᵢ (scale 1),
  so `up @ down` is exactly `Σ wᵢ sᵢ upᵢ downᵢ` (sᵢ = alphaᵢ / rᵢ). Unlike sd-scripts'
  merge_lora without `--concat`, the weights are not squared and no cross terms appear.
- `rank`: every layer's summed delta is re-factorised by SVD (sd-scripts'
  svd_merge_lora), optionally with its quantile clamp; alpha = the new rank. Without a
  clamp, plain LoRA layers are re-factorised from their concatenated factors, never
  forming the delta (`factorize_product`); the others form it, refused over
  MAX_UNSIZED_DELTA values where no base layer sizes it. LyCORIS
  modules (LoHa, LoKr, Tucker LoCon, full) enter through their delta, so mixing
  algorithms needs a rank. Modules whose delta depends on the base weight (IA3, GLoRA,
  OFT, DoRA) need `base`.

Modules of different files meet when they name the same layer: kohya names, peft /
diffusers names (with or without `text_model.`) are compared through their underscore
paths; with `base`, every name is resolved on the base model first, so SDXL LoRAs named
after LDM paths meet diffusers-named ones too.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from sdkit.adapters.lora_export import ExportModule, LoraFacts, Provenance, write_lora
from sdkit.adapters.lora_format import LORA, LoraFile, LoraModule
from sdkit.adapters.lora_math import delta_weight, needs_base_weight
from sdkit.adapters.lora_names import Target, adapter_address, delta_extent, map_modules
from sdkit.arch import Identity
from sdkit.errors import SdkitError, with_article
from sdkit.io.output_path import check_output_path
from sdkit.ops.lora.compute import is_plain_lora
from sdkit.ops.lora.plan import AdapterInput, OpenBase, family_problem, open_adapter, open_base
from sdkit.ops.lora.convert import transformer_base
from sdkit.ops.lora.svd import RankRule, factorize, factorize_product

if TYPE_CHECKING:
    import torch

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")
_DOTTED = (("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"))
_TEXT_WRAP = "text_model_"
_CONV_NAME = re.compile(r"(conv|in_layers_2|out_layers_3|skip_connection|_op$)")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# Values of a dense delta formed without a base to size it: above the largest linear
# layers of 2026 models (FLUX.1 21504 x 3072, Wan 5120 x 13824, Qwen2.5-VL 3584 x 18944,
# Mistral-24B 5120 x 32768); FLUX.2's fused 55296 x 6144 projection needs --base.
MAX_UNSIZED_DELTA = 1 << 28


@dataclass(frozen=True)
class MergeOptions:
    rank: int | None = None  # None: exact concatenation
    conv_rank: int | None = None
    clamp_quantile: float | None = None
    base: str | None = None  # a base model to resolve names and shapes on
    allow_family_mismatch: bool = False  # merge LoRAs made for different families
    format: str = "kohya"
    dtype: str | None = None  # fp16 | bf16 | fp32; default the first input's


@dataclass
class MergeResult:
    output: str
    method: str  # "concat" | "svd"
    layers: int = 0
    ranks: dict[str, int] = field(default_factory=dict)
    retained: dict[str, float] = field(default_factory=dict)  # svd: energy kept per layer
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "method": self.method, "layers": self.layers,
                "ranks": self.ranks, "retained": self.retained, "notes": self.notes}


@dataclass
class Member:
    """One input's module on a layer, with its weight."""

    module: LoraModule
    weight: float


@dataclass
class Layer:
    """All inputs' modules on one layer, and how the output names it."""

    export: ExportModule  # tensors empty until computed
    members: list[Member] = field(default_factory=list)
    target: Target | None = None


# ---- grouping modules by layer -----------------------------------------------------------

def export_identity(module_name: str, target: Target | None) -> ExportModule:
    """How the output names a layer: the base's paths, else the input's own name."""
    if target is not None:
        return ExportModule(target.component, target.diffusers_path, target.ldm_path, {})
    for prefix, component in _DOTTED:
        if module_name.startswith(prefix):
            path = module_name[len(prefix):].removeprefix("base_model.model.")
            return ExportModule(component, path, None, {})
    if module_name.startswith(_KOHYA_PREFIXES):
        component, _ = adapter_address(module_name)
        return ExportModule(component or "unet", None, None, {}, name=module_name)
    raise SdkitError(f"{module_name}: no component prefix to name it by (give --base)")


def layer_key(module_name: str, target: Target | None) -> tuple[str, Any]:
    if target is not None:
        return ("target", (target.weight.key, target.weight.rows))
    component, path = adapter_address(module_name)
    if component != "unet":
        path = path.removeprefix(_TEXT_WRAP)
    return ("name", (component, path))


def group_layers(files: Sequence[tuple[AdapterInput, LoraFile]], base: OpenBase | None,
                 notes: list[str]) -> list[Layer]:
    layers: dict[tuple[str, Any], Layer] = {}
    for item, lora in files:
        targets = _targets(lora, base, item.path, notes)
        for name, module in lora.modules.items():
            target = targets.get(name)
            if base is not None and target is None:
                continue
            key = layer_key(name, target)
            layer = layers.get(key)
            if layer is None:
                layer = layers[key] = Layer(export_identity(name, target), target=target)
            layer.members.append(Member(module, item.strength))
    return list(layers.values())


def _targets(lora: LoraFile, base: OpenBase | None, path: str, notes: list[str]) -> dict[str, Target]:
    if base is None:
        return {}
    mapping = map_modules(lora, base.names, base.bias_shapes)
    if not mapping.mapped:
        raise SdkitError(f"{path}: none of its modules fits the base model")
    if mapping.unmapped:
        name, reason = next(iter(mapping.unmapped.items()))
        notes.append(f"{path}: {len(mapping.unmapped)} modules fit no layer of the base and are "
                     f"left out (e.g. {name}: {reason})")
    return mapping.mapped


# ---- the merged factors ------------------------------------------------------------------

def concatenated(layer: Layer) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(up, down) with `up @ down = Σ wᵢ sᵢ upᵢ downᵢ` exactly; alpha is the total rank."""
    import torch

    ups, downs = [], []
    kernel = tuple(layer.target.shape[1:]) if layer.target is not None else None
    for member in layer.members:
        module = member.module
        if not is_plain_lora(module):
            raise SdkitError(f"{module.name}: {with_article(_kind(module))} module cannot be concatenated "
                             "exactly; give --rank to re-factorise the merged delta")
        down = module.tensors["down"].load().float()
        kernel = kernel or tuple(down.shape[1:])
        if math.prod(down.shape[1:]) != math.prod(kernel):
            raise SdkitError(f"{module.name}: its layer shape differs from the other inputs'")
        ups.append(module.tensors["up"].load().float().flatten(1) * (member.weight * module.scale))
        downs.append(down.reshape(down.shape[0], *kernel))
    up = torch.cat(ups, dim=1)
    down = torch.cat(downs, dim=0)
    if len(kernel) == 3:
        up = up.reshape(*up.shape, 1, 1)
    return up, down


def _kind(module: LoraModule) -> str:
    if module.dora_scale is not None:
        return "DoRA"
    return "Tucker LoCon" if "mid" in module.tensors else module.type


def layer_shape(layer: Layer) -> tuple[int, ...] | None:
    """The adapted layer's weight shape, where the base or a LoRA module tells it."""
    if layer.target is not None:
        return layer.target.shape
    for member in layer.members:
        module = member.module
        if module.type == LORA and "mid" not in module.tensors:
            return (module.tensors["up"].shape[0], *module.tensors["down"].shape[1:])
    return None


def summed_delta(layer: Layer, base: OpenBase | None) -> "torch.Tensor":
    """Σ wᵢ ΔWᵢ in float32, shaped as the layer."""
    shape = layer_shape(layer)
    weight = _base_weight(layer, base)
    total = None
    for member in layer.members:
        if layer.target is None:  # a base's layer bounds the delta; else only this limit
            check_unsized_delta(member.module)
        if needs_base_weight(member.module) and weight is None:
            raise SdkitError(f"{member.module.name}: {with_article(_kind(member.module))} delta depends on the base "
                             "weight; give --base")
        delta, _ = delta_weight(member.module, weight if needs_base_weight(member.module) else None,
                                member.weight)
        if shape is None:
            shape = _unambiguous_shape(member.module, delta)
        delta = delta.reshape(shape)
        total = delta if total is None else total + delta
    return total


def check_unsized_delta(module: LoraModule) -> None:
    """Refuse, before forming it, a dense delta that no base layer sizes and that is
    larger than any real layer (its factors alone could ask for 50 000 x 50 000)."""
    _, count = delta_extent(module)
    if count is not None and count > MAX_UNSIZED_DELTA:
        raise SdkitError(f"{module.name}: its {_kind(module)} delta would hold {count:,} values "
                         f"({count * 4 / 2**30:.1f} GiB in float32), over the limit of "
                         f"{MAX_UNSIZED_DELTA:,} for a layer no base model sizes (give --base)")


def _unambiguous_shape(module: LoraModule, delta: "torch.Tensor") -> tuple[int, ...]:
    if delta.dim() == 2 and _CONV_NAME.search(module.name.replace(".", "_")):
        raise SdkitError(f"{module.name}: the kernel of this conv layer is not stored in the "
                         f"{module.type} factors; give --base")
    return tuple(delta.shape)


def _base_weight(layer: Layer, base: OpenBase | None) -> "torch.Tensor | None":
    if base is None or layer.target is None:
        return None
    if not any(needs_base_weight(m.module) for m in layer.members):
        return None
    weight = base.view.tensors[layer.target.weight.key].load().float()
    rows = layer.target.weight.rows
    return weight if rows is None else weight[rows[0]:rows[1]]


# ---- the operation -----------------------------------------------------------------------

def merge_loras(inputs: Sequence[AdapterInput], output: str | os.PathLike[str],
                options: MergeOptions = MergeOptions(), *, overwrite: bool = False) -> MergeResult:
    """Merge LoRA files (each with its weight) into one file."""
    if len(inputs) < 1:
        raise SdkitError("no LoRA to merge")
    output = Path(output)
    check_output_path(output, (*(item.path for item in inputs), options.base), force=overwrite)
    rule = RankRule(options.rank, options.conv_rank, clamp_quantile=options.clamp_quantile) \
        if options.rank else None
    if rule is not None:
        rule.check()
    with ExitStack() as stack:
        # a transformer base gives the LoRAs' exact sizes: they meet in kohya's names
        transformer = options.base is not None and transformer_base(options.base)
        base = open_base(options.base, stack, transformers=False) if options.base and not transformer else None
        files, identities = _open_all(inputs, stack, options.base if transformer else None)
        family = _common_family(inputs, identities, options.allow_family_mismatch)
        result = MergeResult(str(output), "svd" if rule else "concat")
        layers = group_layers(list(zip(inputs, files)), base, result.notes)
        modules = [_merged(layer, rule, base, result) for layer in layers]
        dtype = lora_dtype(options.dtype, files)
        facts = LoraFacts(family, _prediction(identities))
        params = {"weights": [item.strength for item in inputs], "rank": options.rank,
                  "conv_rank": options.conv_rank, "clamp_quantile": options.clamp_quantile,
                  "format": options.format}
        inputs_paths = tuple(item.path for item in inputs) + ((options.base,) if options.base else ())
        write_lora(output, modules, facts, Provenance("lora-merge", inputs_paths, params),
                   format=options.format, dtype=dtype, overwrite=overwrite)
    result.layers = len(modules)
    return result


def _open_all(inputs: Sequence[AdapterInput], stack: ExitStack,
              transformer_base: str | None = None) -> tuple[list[LoraFile], list[Identity]]:
    """The inputs parsed; transformer LoRAs in kohya's names (q / k / v fused exactly),
    so that every trainer's modules on one layer meet."""
    from sdkit.ops.lora.convert import in_kohya_layout

    files, identities = [], []
    for item in inputs:
        lora, identity = open_adapter(item.path, stack)
        files.append(in_kohya_layout(lora, identity, transformer_base))
        identities.append(identity)
    return files, identities


def _common_family(inputs: Sequence[AdapterInput], identities: Sequence[Identity],
                   allow_mismatch: bool) -> str:
    known = [(item, identity.family) for item, identity in zip(inputs, identities) if identity.family != "unknown"]
    if not known:
        return "unknown"
    first_item, family = known[0]
    for item, other in known[1:]:
        problem = family_problem(family, other)
        if problem and not allow_mismatch:
            raise SdkitError(f"{item.path}: made for {other}, {first_item.path} for {family} "
                             "(--allow-family-mismatch merges them anyway)")
    return family


def _prediction(identities: Sequence[Identity]) -> str:
    return "v" if any(identity.prediction == "v" for identity in identities) else "epsilon"


def lora_dtype(name: str | None, files: Sequence[LoraFile]) -> "torch.dtype":
    """The output dtype: the one asked for, else the first input's first float tensor's."""
    import torch

    from sdkit.io.dtypes import CODE_TO_TORCH

    if name:
        return getattr(torch, DTYPES[name])
    for module in files[0].modules.values():
        for lazy in module.tensors.values():
            dtype = CODE_TO_TORCH[lazy.dtype]
            if dtype.is_floating_point:
                return dtype
    return torch.float32


def note_dropped_biases(layer: Layer, label: str, notes: list[str]) -> None:
    """LoRA factors hold no bias: say so for modules that carried a bias delta."""
    if any("bias" in member.module.tensors for member in layer.members):
        notes.append(f"{label}: its bias delta is left out (a LoRA module holds none)")


def _merged(layer: Layer, rule: RankRule | None, base: OpenBase | None, result: MergeResult) -> ExportModule:
    export = layer.export
    label = export.name or f"{export.component}.{export.diffusers_path or export.ldm_path}"
    note_dropped_biases(layer, label, result.notes)
    if rule is None:
        up, down = concatenated(layer)
        alpha = float(down.shape[0])
    else:
        # the clamp bound is a quantile of signed factor values, so it depends on the
        # signs the full SVD picks (as in sd-scripts): only an unclamped merge may take
        # the factored SVD, whose singular vectors can differ from them in sign
        if rule.clamp_quantile is None and all(is_plain_lora(m.module) for m in layer.members):
            factors = factorize_product(*concatenated(layer), rule)  # no dense delta
        else:
            factors = factorize(summed_delta(layer, base), rule)
        up, down, alpha = factors.up, factors.down, float(factors.rank)
        result.retained[label] = factors.retained
    export.tensors = {"lora_up.weight": up, "lora_down.weight": down}
    export.alpha = alpha
    result.ranks[label] = int(down.shape[0])
    return export
