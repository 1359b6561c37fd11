"""LoRA and LyCORIS algorithms on layers one key convention keeps fused and the other
split (FLUX's `img_attn.qkv` ⇄ `to_q` / `to_k` / `to_v`, `linear1` ⇄ q, k, v and
`proj_mlp`): baked into a base of either convention, and applied at sampling time.

The oracle is the lycoris-lora package: its module wraps an `nn.Linear` holding the layer
as the adapter was trained on it (the whole fused layer, or one part), gets random
weights, and its forward pass gives the merged weight (`f(I) - f(0)`, transposed) and
bias (`f(0)`). A fused adapter baked into a split base must give each part the rows of
that merged weight; a part's adapter baked into a fused base must change exactly its rows.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fixtures.families.released import TINY, tiny_tensors
from sdkit.ops.lora.bake import AdapterInput, BakeOptions, bake_loras
from test_lora_support import single_thread  # noqa: F401  (autouse)
from transformer_loras import converted, load, relative_error, save

QKV = "double_blocks.0.img_attn.qkv"
PARTS = [f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")]
LINEAR1 = "single_blocks.0.linear1"
LINEAR1_PARTS = [f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
# (id, lycoris module class, its options): every algorithm that can sit on a linear layer
ALGORITHMS = [
    ("dora-rows", "locon.LoConModule", dict(lora_dim=4, alpha=2, weight_decompose=True)),
    ("dora-columns", "locon.LoConModule", dict(lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=False)),
    ("loha", "loha.LohaModule", dict(lora_dim=4, alpha=4)),
    ("lokr", "lokr.LokrModule", dict(lora_dim=4, alpha=4, factor=4)),
    ("ia3-rows", "ia3.IA3Module", dict()),
    ("ia3-columns", "ia3.IA3Module", dict(train_on_input=True)),
    ("oft", "diag_oft.DiagOFTModule", dict(lora_dim=8, alpha=0)),
    ("full", "full.FullModule", dict()),
    ("glora", "glora.GLoRAModule", dict(lora_dim=4, alpha=2)),
]


def lycoris_adapter(name: str, weight: torch.Tensor, bias: torch.Tensor | None, algo: str, options: dict,
                    seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """(kohya-named tensors, merged weight, merged bias) of a random LyCORIS module on a
    linear layer of `weight` and `bias`, merged by LyCORIS' own forward pass."""
    import importlib

    from lycoris.logging import logger

    logger.setLevel(logging.ERROR)
    module_name, class_name = algo.rsplit(".", 1)
    cls = getattr(importlib.import_module(f"lycoris.modules.{module_name}"), class_name)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    module = cls(name, layer, 1.0, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter is not layer.weight and parameter is not layer.bias:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    module.apply_to()
    with torch.no_grad():
        zero = module(torch.zeros(1, weight.shape[1]))[0]
        merged = (module(torch.eye(weight.shape[1])) - zero).T.contiguous()
    tensors = {f"{name}.{key}": value.detach().clone() for key, value in module.state_dict().items()}
    return tensors, merged, zero if bias is not None else None


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bases")
    single = tiny_tensors("flux", "ldm")
    split = converted(single, "ldm_to_diffusers")
    return SimpleNamespace(single=single, split=split, folder=folder,
                           single_path=save(single, folder / "single.safetensors"),
                           split_path=save(split, folder / "split.safetensors"))


def bake(base, lora, out, strength=1.0):
    bake_loras(base, [AdapterInput(str(lora), strength)], out, BakeOptions())
    return load(out)


def rows_of(parts: list[str], tensors: dict[str, torch.Tensor], role: str = "weight") -> torch.Tensor:
    return torch.cat([tensors[f"{part}.{role}"] for part in parts])


@pytest.mark.parametrize("fused,parts", [(QKV, PARTS), (LINEAR1, LINEAR1_PARTS)], ids=["qkv", "linear1"])
@pytest.mark.parametrize("algo,cls,options", ALGORITHMS, ids=[a for a, _, _ in ALGORITHMS])
def test_a_fused_module_bakes_into_split_parts_as_its_rows(bases, fused, parts, algo, cls, options, tmp_path):
    if algo == "oft" and fused == LINEAR1:
        options = dict(options, lora_dim=16)  # blocks that cover 224 rows
    weight, bias = bases.single[f"{fused}.weight"], bases.single[f"{fused}.bias"]
    tensors, merged, merged_bias = lycoris_adapter("lora_unet_" + fused.replace(".", "_"), weight, bias, cls, options)
    lora = save(tensors, tmp_path / "adapter.safetensors")
    assert relative_error(merged, weight) > 1e-3  # the adapter changes the layer
    on_split = bake(bases.split_path, lora, tmp_path / "split.safetensors")
    on_single = bake(bases.single_path, lora, tmp_path / "single.safetensors")
    assert relative_error(rows_of(parts, on_split), merged) < 1e-5
    assert relative_error(on_single[f"{fused}.weight"], merged) < 1e-5
    assert relative_error(rows_of(parts, on_split, "bias"), merged_bias) < 1e-5
    untouched = "transformer_blocks.0.attn.add_q_proj.weight"
    assert torch.equal(on_split[untouched], bases.split[untouched])


@pytest.mark.parametrize("algo,cls,options", ALGORITHMS, ids=[a for a, _, _ in ALGORITHMS])
def test_a_part_module_bakes_into_its_rows_of_a_fused_layer(bases, algo, cls, options, tmp_path):
    """A module trained on `to_k` alone: on a fused base its delta is computed on k's rows
    (as ComfyUI narrows the weight to a part before applying the adapter)."""
    part = PARTS[1]
    weight, bias = bases.split[f"{part}.weight"], bases.split[f"{part}.bias"]
    tensors, merged, _ = lycoris_adapter("lora_transformer_" + part.replace(".", "_"), weight, bias, cls,
                                         dict(options, lora_dim=min(options.get("lora_dim", 4), 8)))
    lora = save(tensors, tmp_path / "adapter.safetensors")
    on_single = bake(bases.single_path, lora, tmp_path / "single.safetensors")
    on_split = bake(bases.split_path, lora, tmp_path / "split.safetensors")
    qkv = on_single[f"{QKV}.weight"]
    assert relative_error(qkv[32:64], merged) < 1e-5
    assert torch.equal(qkv[:32], bases.single[f"{QKV}.weight"][:32])
    assert torch.equal(qkv[64:], bases.single[f"{QKV}.weight"][64:])
    assert relative_error(on_split[f"{part}.weight"], merged) < 1e-5


def test_a_dora_module_on_a_swapped_modulation_sees_the_weight_in_its_own_order(bases, tmp_path):
    """`final_layer.adaLN_modulation.1` is (shift, scale), diffusers' `norm_out.linear`
    (scale, shift): a single-file DoRA module baked into a diffusers base."""
    weight, bias = bases.single["final_layer.adaLN_modulation.1.weight"], bases.single["final_layer.adaLN_modulation.1.bias"]
    tensors, merged, _ = lycoris_adapter("lora_unet_final_layer_adaLN_modulation_1", weight, bias,
                                         "locon.LoConModule", dict(lora_dim=4, alpha=2, weight_decompose=True,
                                                                   wd_on_out=False))
    lora = save(tensors, tmp_path / "adapter.safetensors")
    on_split = bake(bases.split_path, lora, tmp_path / "split.safetensors")
    half = merged.shape[0] // 2
    assert relative_error(on_split["norm_out.linear.weight"], torch.cat([merged[half:], merged[:half]])) < 1e-5


def test_runtime_loras_apply_a_fused_dora_to_the_split_transformer(bases, tmp_path):
    """Sampling applies adapters to the loaded diffusers transformer with the bake's code:
    a fused DoRA module reaches q, k and v there too, at its strength."""
    import diffusers

    from sdkit.runtime.sample.flow_lora import FlowLoras
    from sdkit.runtime.sample.lora import LoraRequest

    class_name, config, _ = TINY["flux"]
    transformer = getattr(diffusers, class_name)(**config)
    transformer.load_state_dict(bases.split)
    fused = bases.single[f"{QKV}.weight"]
    tensors, merged, _ = lycoris_adapter("lora_unet_double_blocks_0_img_attn_qkv", fused, None,
                                         "locon.LoConModule", dict(lora_dim=4, alpha=2, weight_decompose=True,
                                                                   wd_on_out=False))
    lora = save(tensors, tmp_path / "dora.safetensors")
    loras = FlowLoras(SimpleNamespace(transformer=transformer), "flux")
    applied = loras.apply([LoraRequest(lora, "dora", unet_strength=0.5)])
    assert applied[0].mapped == 1 and not applied[0].unmapped
    state = transformer.state_dict()
    expected = fused + 0.5 * (merged - fused)  # DoRA's strength interpolates (ComfyUI)
    assert relative_error(rows_of(PARTS, state), expected) < 1e-5
    loras.restore()
    assert torch.equal(rows_of(PARTS, transformer.state_dict()), fused)
