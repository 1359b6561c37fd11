"""Writing LoRA files: kohya format (what A1111, ComfyUI, kohya and diffusers all load) or
diffusers / peft naming.

kohya format: module names `lora_unet_<path>` with the UNet path in diffusers names for
SD1/SD2 and in LDM names for SDXL (as sd-scripts trains them), `lora_te_<path>` for the
one text encoder of SD1/SD2, `lora_te1_` / `lora_te2_` for SDXL's two, text paths in
Hugging Face CLIP names with `text_model.`; dots become underscores. Each module stores
`<name>.lora_up.weight`, `<name>.lora_down.weight` (or another LyCORIS algorithm's
tensors) and `<name>.alpha`, a 0-d float32 tensor (every loader reads it with `.item()`).
LoRA modules all get the same alpha, the commonest one, a module with another alpha
having the ratio folded into its `lora_up`: the delta is the same in every loader, and
diffusers, whose `alpha_pattern` misses kohya module names, scales every module right.
Metadata: sd-scripts' `ss_network_module / dim / alpha / args`, `ss_base_model_version`,
`ss_v2`, the addnet hashes `sshs_model_hash` / `sshs_legacy_hash` (sha256 of the tensor
data; sha256 of 64 KiB at 1 MiB of the file written with only the `ss_*` metadata, first
8 hex, as sd-scripts precomputes them), ModelSpec and the `sdkit.recipe`.

diffusers format: `unet.<path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<path>…`,
paths as the diffusers models name their layers. alpha / rank is folded into `lora_B`,
and `lora_adapter_metadata` holds the peft config per component (`r`, `lora_alpha`
equal to it, rank patterns for other ranks, target modules), as diffusers saves it; the
facts' notes (a trainer's `ss_*` keys) are kept beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from sdkit.errors import SdkitError
from sdkit.io.lazy import LazyTensor
from sdkit.io.writer import build_header, write_order, write_safetensors

if TYPE_CHECKING:
    import torch

FORMATS = ("kohya", "diffusers")
SDXL_FAMILIES = frozenset({"sdxl-base", "sdxl-refiner", "playground-v2.5"})
_TEXT_WRAP = "text_model."
_KOHYA_TEXT = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_", "lora_te2_")}
_PEFT_ROLES = {"lora_up.weight": "lora_B.weight", "lora_down.weight": "lora_A.weight"}
_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000


@dataclass
class ExportModule:
    """One adapted layer to write.

    `tensors` maps kohya / LyCORIS parameter suffixes (`lora_up.weight`,
    `lora_down.weight`, `hada_w1_a`, …) to tensors; `alpha` None writes no alpha.
    """

    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    diffusers_path: str | None  # module path inside the component, diffusers / HF names
    ldm_path: str | None  # module path inside the component, LDM names
    tensors: dict[str, "torch.Tensor"]
    alpha: float | None = None
    name: str | None = None  # a kohya module name to keep as it is (paths then unused)

    @property
    def rank(self) -> int | None:
        for factor in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):  # the rank-wide factor
            if factor in self.tensors:
                return int(self.tensors[factor].shape[0])
        return None

    @property
    def is_conv(self) -> bool:
        down = self.tensors.get("lora_down.weight")
        return down is not None and down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)


@dataclass
class LoraFacts:
    """What the metadata says about the adapter: base family, prediction, network."""

    family: str = "unknown"
    prediction: str = "epsilon"
    network_module: str = "networks.lora"
    notes: dict[str, str] = field(default_factory=dict)  # extra metadata (e.g. ss_training_comment)


def sdxl_naming(family: str, modules: Sequence[ExportModule]) -> bool:
    """SDXL LoRAs name UNet layers after LDM paths and text encoders te1 / te2."""
    return family in SDXL_FAMILIES or any(m.component == "text_encoder_2" for m in modules)


def kohya_module_name(module: ExportModule, sdxl: bool) -> str:
    if module.name:
        return module.name
    if module.component == "unet":
        path = (module.ldm_path or module.diffusers_path) if sdxl else (module.diffusers_path or module.ldm_path)
        prefix = "lora_unet_"
    else:
        path = _text_path(module)
        prefix = _KOHYA_TEXT[module.component][1 if sdxl else 0]
    if not path:
        raise SdkitError(f"{module.component}: a module without a layer path cannot be named")
    return prefix + path.replace(".", "_")


def _text_path(module: ExportModule) -> str | None:
    path = module.diffusers_path
    if path is None:
        return None
    if path.startswith(_TEXT_WRAP) or path.startswith("text_projection"):
        return path
    return _TEXT_WRAP + path


def uniform_alphas(modules: Sequence[ExportModule], common: float | None = None) -> list[ExportModule]:
    """The modules with one alpha for every plain LoRA module (the ratio to a module's own
    alpha folded into its up factor; the delta is unchanged). The alpha is `common` when
    some module has it, else the most frequent one."""
    alphas = [m.alpha for m in modules if m.alpha is not None and "lora_up.weight" in m.tensors]
    if len(set(alphas)) < 2:
        return list(modules)
    if common not in alphas:
        common = Counter(alphas).most_common(1)[0][0]
    out = []
    for module in modules:
        if module.alpha in (None, common) or "lora_up.weight" not in module.tensors:
            out.append(module)
            continue
        tensors = dict(module.tensors)
        up = tensors["lora_up.weight"]
        tensors["lora_up.weight"] = (up.float() * (module.alpha / common)).to(up.dtype)
        out.append(replace(module, tensors=tensors, alpha=common))
    return out


def kohya_state_dict(modules: Sequence[ExportModule], sdxl: bool, dtype: "torch.dtype | None") -> dict[str, "torch.Tensor"]:
    import torch

    state: dict[str, torch.Tensor] = {}
    for module in modules:
        name = kohya_module_name(module, sdxl)
        if name + ".alpha" in state:
            raise SdkitError(f"{name}: two modules share this name")
        for suffix, tensor in module.tensors.items():
            state[f"{name}.{suffix}"] = _cast(tensor, dtype)
        if module.alpha is not None:
            state[name + ".alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    return state


def _cast(tensor: "torch.Tensor", dtype: "torch.dtype | None") -> "torch.Tensor":
    tensor = tensor.detach().contiguous()
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def peft_state_dict(modules: Sequence[ExportModule], dtype: "torch.dtype | None"
                    ) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """(diffusers-named tensors with alpha / rank folded into lora_B, adapter metadata)."""
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, dict[str, int]] = {}
    for module in modules:
        if set(module.tensors) != set(_PEFT_ROLES) or module.diffusers_path is None:
            raise SdkitError(f"{module.component}.{module.diffusers_path or module.ldm_path}: the diffusers "
                             "format holds plain LoRA modules with diffusers names only")
        up, down = module.tensors["lora_up.weight"], module.tensors["lora_down.weight"]
        rank = int(down.shape[0])
        scale = 1.0 if module.alpha is None else module.alpha / rank
        name = f"{module.component}.{module.diffusers_path}"
        state[name + ".lora_B.weight"] = _cast(up.float() * scale, dtype or up.dtype)
        state[name + ".lora_A.weight"] = _cast(down, dtype)
        ranks.setdefault(module.component, {})[module.diffusers_path] = rank
    return state, _adapter_metadata(ranks)


def _adapter_metadata(ranks: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """peft configs per component, flattened under `<component>.` as diffusers stores them."""
    flat: dict[str, Any] = {}
    for component, by_path in ranks.items():
        common = Counter(by_path.values()).most_common(1)[0][0]
        other = {path: r for path, r in sorted(by_path.items()) if r != common}
        config = {"r": common, "lora_alpha": common, "rank_pattern": other, "alpha_pattern": other,
                  "target_modules": sorted(by_path), "use_dora": False, "lora_bias": False}
        flat.update({f"{component}.{key}": value for key, value in config.items()})
    return flat


# ---- metadata and hashes ---------------------------------------------------------------

def network_metadata(modules: Sequence[ExportModule], facts: LoraFacts) -> dict[str, str]:
    """sd-scripts' `ss_*` keys for these modules (dims and alphas "Dynamic" when they vary)."""
    from sdkit.arch.families import FAMILIES, kohya_base_model_version

    linear = [m for m in modules if not m.is_conv]
    conv = [m for m in modules if m.is_conv]
    metadata = {"ss_network_module": facts.network_module,
                "ss_network_dim": _uniform(m.rank for m in linear),
                "ss_network_alpha": _uniform(m.alpha for m in linear),
                "ss_v2": str(facts.family == "sd2")}
    if conv:
        metadata["ss_network_args"] = json.dumps({"conv_dim": _uniform(m.rank for m in conv),
                                                  "conv_alpha": _uniform(m.alpha for m in conv)})
    if facts.family in FAMILIES:
        version = kohya_base_model_version(facts.family, prediction=facts.prediction)
        if version:
            metadata["ss_base_model_version"] = version
    metadata.update(facts.notes)
    return metadata


def _uniform(values: Any) -> str:
    found = {v for v in values if v is not None}
    if len(found) == 1:
        value = found.pop()
        return str(float(value)) if isinstance(value, float) else str(value)
    return "Dynamic" if found else "None"


def addnet_hashes(tensors: Mapping[str, LazyTensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """`sshs_model_hash` / `sshs_legacy_hash` of the file these tensors make with only the
    `ss_*` metadata (tensors are loaded; meant for adapter-sized files)."""
    header = build_header(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    data = hashlib.sha256()
    window = bytearray()
    position = 8 + len(header)
    prefix = len(header).to_bytes(8, "little") + header
    window += prefix[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]
    for name in write_order(tensors):
        raw = _tensor_bytes(tensors[name].load())
        data.update(raw)
        begin, end = max(_LEGACY_OFFSET, position), min(_LEGACY_OFFSET + _LEGACY_LENGTH, position + len(raw))
        if begin < end:
            window += raw[begin - position:end - position]
        position += len(raw)
    return {"sshs_model_hash": data.hexdigest(), "sshs_legacy_hash": hashlib.sha256(window).hexdigest()[:8]}


def _tensor_bytes(tensor: "torch.Tensor") -> bytes:
    import torch

    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ---- writing -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Provenance:
    """The recipe written into `sdkit.recipe`: operation, input paths, parameters."""

    operation: str
    inputs: tuple[str, ...]
    params: Mapping[str, Any]
    hashes: Mapping[str, str] = field(default_factory=dict)


def write_lora(path: str | os.PathLike[str], modules: Sequence[ExportModule], facts: LoraFacts,
               provenance: Provenance, *, format: str = "kohya", dtype: "torch.dtype | None" = None,
               common_alpha: float | None = None, overwrite: bool = False) -> Path:
    """Write `modules` as one LoRA file (atomically); returns the path written.
    `common_alpha`: the alpha to give every plain LoRA module in a kohya file (see
    `uniform_alphas`)."""
    from sdkit.ops.recipe_meta import DIFFUSERS_IMPLEMENTATION, SpecFacts, build_metadata

    if format not in FORMATS:
        raise SdkitError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if not modules:
        raise SdkitError(f"{path}: no modules to write")
    path = Path(path)
    sdxl = sdxl_naming(facts.family, modules)
    if format == "kohya":
        modules = uniform_alphas(modules, common_alpha)
        state, extra = kohya_state_dict(modules, sdxl, dtype), network_metadata(modules, facts)
    else:
        state, adapter = peft_state_dict(modules, dtype)
        extra = {**facts.notes, "lora_adapter_metadata": json.dumps(adapter, sort_keys=True)}
    # kohya names SDXL and transformer layers after the original code's modules
    implementation = None if format == "kohya" and (sdxl or _single_file_names(facts.family)) \
        else DIFFUSERS_IMPLEMENTATION
    spec = SpecFacts(family=facts.family, prediction=facts.prediction, adapter="lora",
                     implementation=implementation)
    metadata = build_metadata(provenance.operation, provenance.inputs, provenance.params, spec, extra,
                              title=path.stem, hashes=provenance.hashes)
    lazies = {name: _lazy(tensor) for name, tensor in state.items()}
    if format == "kohya":
        metadata.update(addnet_hashes(lazies, metadata))
    return write_safetensors(path, lazies, metadata, overwrite=overwrite)


def _single_file_names(family: str) -> bool:
    from sdkit.arch.families import FAMILIES

    found = FAMILIES.get(family)
    return found is not None and found.key_map is not None and not found.key_map.same_names


def _lazy(tensor: "torch.Tensor") -> LazyTensor:
    from sdkit.io.model_file import dtype_code

    return LazyTensor(dtype_code(tensor.dtype), tuple(tensor.shape), lambda: tensor)
