"""Transformer LoRA bakes against the peers: a LoRA made by peft on the tiny diffusers
model (every linear layer, random factors, alpha ≠ rank) and fused by diffusers
(`fuse_lora`, peft's merge) is what sdkit bakes, into the diffusers base and into its
single-file twin, from the diffusers / peft file and from the same LoRA in kohya's layout
(q, k, v fused into one module with a block-diagonal up factor); diffusers' own kohya FLUX
converter reads that layout to the same weights; `lora check` maps every module."""

from __future__ import annotations

import json

import pytest
import torch

from cli_run import run_sdkit
from fixtures.families.released import TINY
from sdkit.cli import lora_cmd  # noqa: F401  (attaches `lora` to the group)
from sdkit.ops.lora.bake import AdapterInput, BakeOptions, bake_loras
from test_lora_support import single_thread  # noqa: F401  (autouse)
from transformer_loras import assert_close, converted, kohya_layout, load, save

RANK, ALPHA = 4, 8.0
PEERS = ["flux", "sd3", "z-image"]


def fused_by_diffusers(family: str, seed: int = 0):
    """(base state dict, peft LoRA in diffusers' file layout, the base with the LoRA fused)."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    class_name, config, _ = TINY[family]
    torch.manual_seed(seed)
    model = getattr(diffusers, class_name)(**config).eval()
    base = {name: value.clone() for name, value in model.state_dict().items()}
    linears = sorted(name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear))
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=linears, init_lora_weights=False))
    lora = {"transformer." + name: value.clone() for name, value in get_peft_model_state_dict(model).items()}
    model.fuse_lora()
    fused = {name.replace(".base_layer.", "."): value for name, value in model.state_dict().items()
             if "lora_" not in name}
    assert set(fused) == set(base)
    return base, lora, fused


@pytest.fixture(scope="module", params=PEERS)
def peer(request, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    base, lora, fused = fused_by_diffusers(family)
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": ALPHA})}
    single = converted(base, "diffusers_to_ldm")
    return {"family": family, "fused": fused, "dir": folder,
            "diffusers": save(base, folder / "diffusers.safetensors"),
            "single": save(single, folder / "single.safetensors"),
            "peft": save(lora, folder / "peft.safetensors", metadata),
            "kohya": save(kohya_layout(lora, ALPHA / RANK, single), folder / "kohya.safetensors")}


def baked(peer, base: str, lora: str):
    out = peer["dir"] / f"{base}-{lora}.safetensors"
    if not out.exists():
        bake_loras(peer[base], [AdapterInput(str(peer[lora]))], out, BakeOptions())
    tensors = load(out)
    return tensors if base == "diffusers" else converted(tensors, "ldm_to_diffusers")


@pytest.mark.parametrize("base", ["diffusers", "single"])
@pytest.mark.parametrize("lora", ["peft", "kohya"])
def test_bake_matches_diffusers_fuse_lora(peer, base, lora):
    assert_close(baked(peer, base, lora), peer["fused"])


def test_kohya_layout_fuses_q_k_v_into_one_module(peer):
    tensors = load(peer["kohya"])
    fused_names = [name for name in tensors if name.endswith("qkv.lora_up.weight")]
    assert fused_names
    up = tensors[fused_names[0]]
    assert up.shape[1] == 3 * RANK and up[: up.shape[0] // 3, RANK:].abs().sum() == 0


@pytest.mark.parametrize("lora", ["peft", "kohya"])
def test_check_maps_every_module(peer, lora, capsys):
    for base in ("diffusers", "single"):
        code, out, _ = run_sdkit(capsys, "lora", "check", str(peer[base]), str(peer[lora]), "--json")
        report = json.loads(out)
        assert code == 0 and report["verdict"] == "all" and report["unmapped"] == {}
        assert report["base_family"] == peer["family"] and report["mapped"] == report["modules"]


def test_diffusers_reads_the_kohya_layout_to_the_same_weights(tmp_path):
    """diffusers' kohya FLUX converter (it cuts a single block's `linear1` at the released
    widths, so the tiny model's are left out) turns the kohya file into per-part modules
    that sdkit bakes to what it bakes from the kohya file itself."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    base, lora, _ = fused_by_diffusers("flux")
    single = converted(base, "diffusers_to_ldm")
    kohya = {name: value for name, value in kohya_layout(lora, ALPHA / RANK, single).items()
             if "double_blocks" in name}
    by_diffusers = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    base_path = save(base, tmp_path / "base.safetensors")
    results = []
    for name, state in (("kohya", kohya), ("diffusers", by_diffusers)):
        out = tmp_path / f"{name}-out.safetensors"
        bake_loras(base_path, [AdapterInput(str(save(state, tmp_path / f"{name}.safetensors")))], out)
        results.append(load(out))
    assert_close(results[0], results[1])
    assert any(not torch.equal(results[0][k], base[k]) for k in base)
