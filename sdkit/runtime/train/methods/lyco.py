"""peft adapter weights as kohya / LyCORIS modules for `sdkit.adapters.lora_export`.

peft's LoRA, LoHa and LoKr layers hold the same factors kohya and LyCORIS files store,
under other names (research: train.md §5): `lora_A` / `lora_B` are kohya's `lora_down` /
`lora_up`; `hada_*` and `lokr_*` keep their names. peft scales every layer by
alpha / r; kohya and LyCORIS files store alpha and readers divide by the rank of the
factored half — except a LoKr layer with both halves full, where LyCORIS (and A1111,
ComfyUI) apply no scaling at all, so peft's alpha / r is folded into `lokr_w2` there.
"""

from __future__ import annotations

from typing import Mapping

import torch

from sdkit.adapters.lora_export import ExportModule

_PEFT_ROLES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_LYCORIS_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                  "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_ROLES = {**_PEFT_ROLES, **{role: role for role in _LYCORIS_ROLES}}


def _split(key: str) -> tuple[str, str] | None:
    """(module path, kohya role) of a peft state-dict key."""
    for role, kohya in _ROLES.items():
        if key.endswith("." + role):
            return key[: -len(role) - 1], kohya
    return None


def export_modules(peft_state: Mapping[str, torch.Tensor], component: str, rank: int, alpha: float,
                   ldm_paths: Mapping[str, str] | None = None,
                   own_ranks: Mapping[str, tuple[int, float]] | None = None) -> list[ExportModule]:
    """One ExportModule per adapted layer of `component`; `ldm_paths` maps diffusers module
    paths to LDM ones (SDXL files name UNet layers after them); `own_ranks` gives the
    (rank, alpha) of layers trained at another rank (kohya's conv_dim / conv_alpha)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in peft_state.items():
        split = _split(key)
        if split is None:
            raise ValueError(f"unexpected peft adapter key {key!r}")
        path, role = split
        grouped.setdefault(path, {})[role] = tensor.detach().float().cpu()
    modules = []
    for path, tensors in sorted(grouped.items()):
        layer_rank, layer_alpha = (own_ranks or {}).get(path, (rank, alpha))
        if "lokr_w1" in tensors and "lokr_w2" in tensors:
            tensors["lokr_w2"] = tensors["lokr_w2"] * (layer_alpha / layer_rank)
        ldm = (ldm_paths or {}).get(path)
        modules.append(ExportModule(component, path, ldm, tensors, alpha=layer_alpha))
    return modules
