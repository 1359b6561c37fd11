"""LoRA-family adapters applied to a loaded transformer pipeline (FLUX.1, SD3, Chroma, …).

The transformer's weights are seen as an in-memory model in diffusers names, indexed by
the family's key map (`adapters.transformer_names`), and every adapter is planned and
computed by `lora bake`'s own code (`ops.lora.plan.plan_bake`, `ops.lora.compute.KeyBaker`):
a kohya / ComfyUI module on a fused single-file layer (`img_attn.qkv`, `linear1`) lands
on the rows of q, k, v and the MLP input it covers, a swapped modulation with its halves
exchanged. So sampling with a LoRA at strength s draws the picture of the transformer
baked with it at s. Text-encoder modules (kohya's `lora_te1_` CLIP-L / `lora_te2_` CLIP-G /
`lora_te3_` T5, diffusers' `text_encoder.` …) reach the pipeline's encoders the same way,
seen as a ComfyUI all-in-one checkpoint holds them (`text_encoders.clip_l.transformer.`,
…), at the request's text-encoder strength. Weights it changes are kept and put back by
`restore()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from sdkit.adapters.lora_names import ModelNames
from sdkit.adapters.transformer_names import find_denoiser, transformer_names
from sdkit.arch import FAMILIES, Identity
from sdkit.errors import SdkitError
from sdkit.io import LazyTensor, lazy_tensors
from sdkit.io.model_file import dtype_code, model_from_tensors
from sdkit.ops.adapter_input import AdapterInput
from sdkit.ops.layout import ModelView
from sdkit.ops.lora.compute import KeyBaker
from sdkit.ops.lora.plan import OpenBase, open_adapter, plan_bake
from sdkit.runtime.sample.lora import (
    AppliedLora,
    ChangedWeights,
    LoraRequest,
    lora_short_hash,
)

_DENOISER_ROOT = "model.diffusion_model."  # where the in-memory model keeps the transformer


class FlowLoras(ChangedWeights):
    """Adapters on one flow pipeline's transformer and text encoders; `apply` (re)writes
    the weights."""

    def __init__(self, pipe: Any, family: str) -> None:
        self.family = family
        # key prefix of the in-memory model -> the module whose parameters it names
        self.modules: dict[str, torch.nn.Module] = {_DENOISER_ROOT: pipe.transformer}
        for spec in FAMILIES[family].text_encoders:
            encoder = getattr(pipe, spec.component, None)
            if encoder is not None and spec.comfyui_name:
                self.modules[f"text_encoders.{spec.comfyui_name}.transformer."] = encoder
        model = model_from_tensors({prefix + k: v.detach().cpu() for prefix, module in self.modules.items()
                                    for k, v in module.state_dict().items()})
        found = find_denoiser(model)
        if found is None:
            raise SdkitError(f"the {family} transformer's weights match no layout sdkit knows")
        root, match = found
        tensors = lazy_tensors(model)
        self.names: ModelNames = transformer_names(tensors, root, match)
        view = ModelView("diffusers", family, tensors, ["transformer"])
        self.base = OpenBase(model, Identity("checkpoint", family=family, components=["transformer"]), view,
                             self.names, match)
        self.originals: dict[str, torch.Tensor] = {}

    def apply(self, requests: Sequence[LoraRequest]) -> list[AppliedLora]:
        """Restore, then bake every request in: its diffusion-model modules at its UNet
        strength, its text-encoder modules at its text-encoder strength."""
        self.restore()
        weights: dict[str, list] = {}
        biases: dict[str, list] = {}
        reports: dict[int, Any] = {}
        with ExitStack() as stack:
            for components, strength in (("unet", _unet_strength), ("te", _te_strength)):
                active = [(number, r) for number, r in enumerate(requests) if strength(r) != 0]
                if not active:
                    continue
                plan = plan_bake(self.base, [AdapterInput(str(r.path), strength(r)) for _n, r in active], stack,
                                 components=components)
                for table, planned in ((weights, plan.weights), (biases, plan.biases)):
                    for key, contributions in planned.items():
                        table.setdefault(key, []).extend(contributions)
                for (number, _r), report in zip(active, plan.reports):
                    if number in reports:  # the modules the other plan left to this one
                        reports[number].mapped += report.mapped
                    else:
                        reports[number] = report
            hashes = {number: lora_short_hash(requests[number].path, open_adapter(str(requests[number].path),
                                                                                  stack)[0]) for number in reports}
            self._bake(weights, biases)
        return [AppliedLora(request, self.family, reports[number].mapped, dict(reports[number].unmapped),
                            hashes[number]) if number in reports else AppliedLora(request, self.family, 0)
                for number, request in enumerate(requests)]

    def _parameter(self, key: str) -> torch.nn.Parameter:
        prefix = next(prefix for prefix in self.modules if key.startswith(prefix))
        return self.modules[prefix].get_parameter(key[len(prefix):])

    def _bake(self, weights: dict, biases: dict) -> None:
        keys = sorted(set(weights) | set(biases))
        codes = {key: dtype_code(self._parameter(key).dtype) for key in keys}
        baker = KeyBaker(self._original_sources(), weights, biases, codes)
        with torch.no_grad():
            for key in keys:
                parameter = self._parameter(key)
                self.originals.setdefault(key, parameter.detach().clone())
                parameter.copy_(baker.compute(key).to(parameter.device))

    def _original_sources(self) -> dict[str, LazyTensor]:
        """The in-memory model's tensors as they were before this bake: its tensors share
        the parameters' storage on the CPU, and a delta spread over several tensors (a
        fused q|k|v module on q, k and v) reads the others' weights after some are
        rewritten; the kept originals sit on the pipeline's device, the bake runs on the CPU."""
        def original(key: str, lazy: LazyTensor) -> torch.Tensor:
            return self.originals[key].cpu() if key in self.originals else lazy.load()

        return {key: replace(lazy, load=partial(original, key, lazy), span=None, chunks=None)
                for key, lazy in self.base.view.tensors.items()}

    def close(self) -> None:
        self.restore()


def _unet_strength(request: LoraRequest) -> float:
    return request.unet_strength


def _te_strength(request: LoraRequest) -> float:
    return request.te_strength
