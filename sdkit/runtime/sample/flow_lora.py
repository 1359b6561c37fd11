"""LoRA-family adapters applied to a loaded FLUX.1 pipeline's transformer.

The transformer's weights are seen as an in-memory model in diffusers names, indexed by
the family's key map (`adapters.transformer_names`), and every adapter is planned and
computed by `lora bake`'s own code (`ops.lora.plan.plan_bake`, `ops.lora.compute.KeyBaker`):
a kohya / ComfyUI module on a fused single-file layer (`img_attn.qkv`, `linear1`) lands
on the rows of q, k, v and the MLP input it covers, a swapped modulation with its halves
exchanged. So sampling with a LoRA at strength s draws the picture of the transformer
baked with it at s. Weights it changes are kept and put back by `restore()`. Text-encoder
modules of such adapters are not applied here (they are listed as reaching no layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch

from sdkit.adapters.lora_names import ModelNames
from sdkit.adapters.transformer_names import find_denoiser, transformer_names
from sdkit.arch import Identity
from sdkit.errors import SdkitError
from sdkit.io import lazy_tensors
from sdkit.io.model_file import dtype_code, model_from_tensors
from sdkit.ops.adapter_input import AdapterInput
from sdkit.ops.layout import ModelView
from sdkit.ops.lora.compute import KeyBaker
from sdkit.ops.lora.plan import OpenBase, open_adapter, plan_bake
from sdkit.runtime.sample.lora import AppliedLora, LoraRequest, lora_short_hash


class FlowLoras:
    """Adapters on one flow pipeline's transformer; `apply` (re)writes the weights."""

    def __init__(self, pipe: Any, family: str) -> None:
        self.transformer = pipe.transformer
        self.family = family
        model = model_from_tensors({k: v.detach().cpu() for k, v in self.transformer.state_dict().items()})
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
        """Restore, then bake every request in at its diffusion-model strength."""
        self.restore()
        active = [request for request in requests if request.unet_strength != 0]
        if not active:
            return [AppliedLora(request, self.family, 0) for request in requests]
        with ExitStack() as stack:
            plan = plan_bake(self.base, [AdapterInput(str(r.path), r.unet_strength) for r in active], stack)
            hashes = [lora_short_hash(r.path, open_adapter(str(r.path), stack)[0]) for r in active]
            self._bake(plan.weights, plan.biases)
        return [AppliedLora(request, self.family, report.mapped, dict(report.unmapped), short_hash)
                for request, report, short_hash in zip(active, plan.reports, hashes)]

    def _bake(self, weights: dict, biases: dict) -> None:
        keys = sorted(set(weights) | set(biases))
        codes = {key: dtype_code(self.transformer.get_parameter(key).dtype) for key in keys}
        baker = KeyBaker(self.base.view.tensors, weights, biases, codes)
        with torch.no_grad():
            for key in keys:
                parameter = self.transformer.get_parameter(key)
                self.originals.setdefault(key, parameter.detach().clone())
                parameter.copy_(baker.compute(key).to(parameter.device))

    def restore(self) -> None:
        with torch.no_grad():
            for key, original in self.originals.items():
                self.transformer.get_parameter(key).copy_(original)
        self.originals.clear()

    def close(self) -> None:
        self.restore()
