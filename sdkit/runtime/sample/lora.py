"""LoRA-family adapters applied to a loaded pipeline, once, by changing its weights.

For every layer an adapter reaches, `W' = W + Σ strength · ΔW` is computed in float32
against the original weight and cast once to the layer's dtype, exactly as
`sdkit.ops.lora.bake` bakes a file, so sampling with a LoRA at strength s gives the image of
the checkpoint baked with it at s. The originals are kept and put back by `restore()`;
the adapter files are never changed. Module names are resolved by
`sdkit.adapters.lora_names` (every dialect `parse_lora` reads, kohya SD1 diffusers-path
names and SDXL LDM-path names alike). Strengths are per part: text encoders and UNet.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from sdkit.adapters.lora_format import LoraFile, LoraModule
from sdkit.adapters.lora_math import delta_weight, needs_base_weight
from sdkit.adapters.lora_names import ModelNames, Target, map_modules, model_names, require_some
from sdkit.errors import SdkitError
from sdkit.io import LazyTensor, hash_file
from sdkit.io.model_file import dtype_code
from sdkit.ops.lora.plan import family_problem, open_adapter


@dataclass(frozen=True)
class LoraRequest:
    """One adapter to apply: the file, the name it goes by, its two strengths."""

    path: Path
    name: str
    te_strength: float = 1.0
    unet_strength: float = 1.0

    def strength_for(self, component: str) -> float:
        return self.unet_strength if component == "unet" else self.te_strength


@dataclass
class AppliedLora:
    """What one adapter did: layers reached, modules that reached none (and why)."""

    request: LoraRequest
    family: str
    mapped: int
    unmapped: dict[str, str] = field(default_factory=dict)
    short_hash: str | None = None


@dataclass
class _Loaded:
    lora: LoraFile
    family: str
    targets: dict[str, Target]
    unmapped: dict[str, str]
    short_hash: str | None


def lora_short_hash(path: Path, lora: LoraFile) -> str | None:
    """The 12-hex hash A1111 shows for a LoRA: kohya's stored `sshs_model_hash`, else
    AutoV3 (the hash of a safetensors file's tensor data), else the file's sha256."""
    stored = lora.metadata.get("sshs_model_hash")
    if stored:
        return stored[:12]
    hashes = hash_file(path)
    return hashes.autov3 or (hashes.sha256[:12] if hashes.sha256 else None)


def pipeline_tensors(pipe: Any, components: Sequence[str]) -> dict[str, LazyTensor]:
    """The pipeline's weights as `<component>/<key>` lazy tensors (no copies)."""
    tensors: dict[str, LazyTensor] = {}
    for component in components:
        for key, tensor in getattr(pipe, component).state_dict().items():
            tensors[f"{component}/{key}"] = LazyTensor(dtype_code(tensor.dtype), tuple(tensor.shape),
                                                       lambda t=tensor: t)
    return tensors


def _config(module: Any) -> dict[str, Any]:
    config = module.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


class ChangedWeights:
    """The original values of the weights an adapter changed, put back by `restore()`;
    `_parameter(key)` says which parameter a key names."""

    originals: dict[str, torch.Tensor]

    def _parameter(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def restore(self) -> None:
        """Every changed weight back to its original value."""
        with torch.no_grad():
            for key, original in self.originals.items():
                self._parameter(key).copy_(original)
        self.originals.clear()


class RuntimeLoras(ChangedWeights):
    """Adapters held open for one pipeline; `apply` (re)writes the weights, `restore`
    puts the originals back, `close` releases the files."""

    def __init__(self, pipe: Any, family: str, layout: str) -> None:
        self.pipe = pipe
        self.family = family
        components = [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
        self.tensors = pipeline_tensors(pipe, components)
        configs = {c: _config(getattr(pipe, c)) for c in components}
        self.names: ModelNames = model_names("diffusers", layout, self.tensors, configs)
        self.stack = ExitStack()
        self.loaded: dict[Path, _Loaded] = {}
        self.originals: dict[str, torch.Tensor] = {}

    def _load(self, request: LoraRequest) -> _Loaded:
        if request.path not in self.loaded:
            lora, identity = open_adapter(str(request.path), self.stack)
            problem = family_problem(self.family, identity.family)
            if problem:
                raise SdkitError(f"{request.path}: {problem}")
            bias_shapes = {name: lazy.shape for name, lazy in self.tensors.items()}
            mapping = map_modules(lora, self.names, bias_shapes)
            require_some(mapping, str(request.path))
            self.loaded[request.path] = _Loaded(lora, identity.family, mapping.mapped, mapping.unmapped,
                                                lora_short_hash(request.path, lora))
        return self.loaded[request.path]

    def apply(self, requests: Sequence[LoraRequest]) -> list[AppliedLora]:
        """Restore, then add every request's deltas (strength 0 parts are skipped)."""
        self.restore()
        weights: dict[str, list[tuple[LoraModule, float]]] = {}
        biases: dict[str, list[tuple[LoraModule, float]]] = {}
        reports = []
        for request in requests:
            loaded = self._load(request)
            for name, target in loaded.targets.items():
                strength = request.strength_for(target.component)
                module = loaded.lora.modules[name]
                if strength == 0:
                    continue
                weights.setdefault(target.weight.key, []).append((module, strength))
                if "bias" in module.tensors and target.bias is not None:
                    biases.setdefault(target.bias.key, []).append((module, strength))
            reports.append(AppliedLora(request, loaded.family, len(loaded.targets), dict(loaded.unmapped),
                                       loaded.short_hash))
        with torch.no_grad():
            for key, contributions in weights.items():
                self._add(key, contributions, _weight_delta)
            for key, contributions in biases.items():
                self._add(key, contributions, _bias_delta)
        return reports

    def _parameter(self, key: str) -> torch.Tensor:
        component, _, inner = key.partition("/")
        return getattr(self.pipe, component).get_parameter(inner)

    def _add(self, key: str, contributions: list[tuple[LoraModule, float]], delta_of: Any) -> None:
        parameter = self._parameter(key)
        original = self.originals.setdefault(key, parameter.detach().clone())
        base = original.to(torch.float32)
        result = base.clone()
        for module, strength in contributions:
            result.add_(delta_of(module, base, strength).to(result.device).reshape(base.shape))
        if parameter.dtype.is_floating_point and parameter.dtype.itemsize < 4:  # stay finite
            limit = torch.finfo(parameter.dtype).max
            result.clamp_(-limit, limit)
        parameter.copy_(result.to(parameter.dtype))

    def close(self) -> None:
        self.restore()
        self.stack.close()
        self.loaded.clear()


def _weight_delta(module: LoraModule, base: torch.Tensor, strength: float) -> torch.Tensor:
    context = base.cpu() if needs_base_weight(module) else None
    delta, _ = delta_weight(module, context, strength)
    return delta


def _bias_delta(module: LoraModule, base: torch.Tensor, strength: float) -> torch.Tensor:
    return module.tensors["bias"].load().to(torch.float32) * strength


def with_strength(requests: Sequence[LoraRequest], strength: float) -> list[LoraRequest]:
    """The same adapters, every one at `strength` (text encoders and UNet)."""
    return [replace(request, te_strength=strength, unet_strength=strength) for request in requests]
