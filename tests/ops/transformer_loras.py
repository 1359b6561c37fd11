"""Tiny transformer bases and LoRAs for the transformer bake tests (helpers only).

Bases come from `fixtures.families.released.TINY` (the configs of diffusers' own model
tests) in either key convention; the single-file twin of a diffusers model is made with
sdkit's key map, so both bases hold the same weights. LoRAs are random, in the diffusers /
peft layout or in kohya's, over every matrix a base's index lists; `kohya_layout` turns a
diffusers-layout LoRA into kohya sd-scripts' (`networks/lora_flux.py`): modules named
after the single-file path with underscores, `lora_down` / `lora_up` / `alpha`, and q, k,
v (and FLUX's MLP input) LoRAs fused into one module whose down factors are stacked and
whose up factor is block-diagonal, as its `split_qkv` state dict stores them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdkit.adapters.transformer_names import find_denoiser, transformer_names
from sdkit.arch.keymaps.recipe import convert_state_dict
from sdkit.arch.keymaps.transformer import transformer_links, transformer_plan
from sdkit.io import lazy_tensors, model_from_tensors


def layout_match(tensors: dict[str, torch.Tensor]):
    found = find_denoiser(model_from_tensors(tensors))
    assert found is not None
    return found


def index(tensors: dict[str, torch.Tensor]):
    root, match = layout_match(tensors)
    return transformer_names(lazy_tensors(model_from_tensors(tensors)), root, match)


def converted(tensors: dict[str, torch.Tensor], direction: str) -> dict[str, torch.Tensor]:
    """`tensors` in the other key convention, through the family's key map."""
    _, match = layout_match(tensors)
    plan = transformer_plan(match.family, match.dims, direction, list(tensors))
    return {name: value.contiguous() for name, value in convert_state_dict(plan, tensors).items()}


def save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file({name: value.contiguous() for name, value in tensors.items()}, str(path), metadata=metadata)
    return path


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def random_lora(base: dict[str, torch.Tensor], naming: str, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LoRA on every matrix of `base`, named by its diffusers path (`transformer.`
    peft names, lora_A / lora_B) or its single-file path (kohya names, with alpha)."""
    generator = torch.Generator().manual_seed(seed)
    path_of = "diffusers_path" if naming == "diffusers" else "ldm_path"
    lora: dict[str, torch.Tensor] = {}
    for target in index(base).targets:
        path = getattr(target, path_of)
        if path is None or len(target.shape) != 2:
            continue
        rows, columns = target.shape
        down = torch.randn(rank, columns, generator=generator) * 0.1
        up = torch.randn(rows, rank, generator=generator) * 0.1
        if naming == "diffusers":
            lora[f"transformer.{path}.lora_A.weight"], lora[f"transformer.{path}.lora_B.weight"] = down, up
        else:
            name = "lora_unet_" + path.replace(".", "_")
            lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"] = down, up
            lora[f"{name}.alpha"] = torch.tensor(float(rank) * 2)  # scale 2
    return lora


def kohya_layout(peft: dict[str, torch.Tensor], scale: float, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-layout LoRA (`transformer.<path>.lora_A/B.weight`, every module scaled by
    `scale`) in kohya's layout for the single-file names of `base`'s family."""
    _, match = layout_match(base)
    factors = {name[len("transformer."): -len(".lora_A.weight")]: (peft[name], peft[name.replace("lora_A", "lora_B")])
               for name in peft if name.endswith(".lora_A.weight")}
    out: dict[str, torch.Tensor] = {}
    for link in transformer_links(match.family.key_map, match.dims):
        if not link.ldm[0].endswith(".weight"):
            continue
        parts = [name[: -len(".weight")] for name in link.diffusers]
        if not all(part in factors for part in parts):
            continue
        downs, ups = zip(*(factors[part] for part in parts))
        if link.kind == "fused":
            down, up = torch.cat(downs), torch.block_diag(*ups)
        elif link.kind == "swap":
            half = ups[0].shape[0] // 2
            down, up = downs[0], torch.cat([ups[0][half:], ups[0][:half]])
        else:
            down, up = downs[0], ups[0]
        name = "lora_unet_" + link.ldm[0][: -len(".weight")].replace(".", "_")
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(scale * down.shape[0])
    return out


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.float()
    return float((value.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def assert_close(result: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tolerance: float = 1e-5) -> None:
    assert set(result) == set(reference), sorted(set(result) ^ set(reference))[:5]
    worst = max(((relative_error(result[k], reference[k]), k) for k in reference), default=(0.0, ""))
    assert worst[0] <= tolerance, worst


__all__ = ["assert_close", "converted", "index", "kohya_layout", "layout_match", "load",
           "random_lora", "relative_error", "save"]
