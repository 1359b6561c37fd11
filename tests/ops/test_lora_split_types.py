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
from test_lora_support import single_thread  # noqa: F401  (autouse)
from torch import nn
from transformer_loras import converted, index, load, relative_error, save

from fixtures.families.released import TINY, tiny_tensors
from sdkit.errors import SdkitError
from sdkit.ops.lora.bake import AdapterInput, BakeOptions, bake_loras

QKV = "double_blocks.0.img_attn.qkv"
PARTS = [f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")]
LINEAR1 = "single_blocks.0.linear1"
LINEAR1_PARTS = [f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
# (id, lycoris module class, its options): every algorithm that can sit on a linear layer
ALGORITHMS = [
    ("dora-rows", "locon.LoConModule", {"lora_dim": 4, "alpha": 2, "weight_decompose": True}),
    ("dora-columns", "locon.LoConModule", {"lora_dim": 4, "alpha": 2, "weight_decompose": True, "wd_on_out": False}),
    ("loha", "loha.LohaModule", {"lora_dim": 4, "alpha": 4}),
    ("lokr", "lokr.LokrModule", {"lora_dim": 4, "alpha": 4, "factor": 4}),
    ("ia3-rows", "ia3.IA3Module", {}),
    ("ia3-columns", "ia3.IA3Module", {"train_on_input": True}),
    ("oft", "diag_oft.DiagOFTModule", {"lora_dim": 8, "alpha": 0}),
    ("full", "full.FullModule", {}),
    ("glora", "glora.GLoRAModule", {"lora_dim": 4, "alpha": 2}),
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
                                         "locon.LoConModule", {"lora_dim": 4, "alpha": 2, "weight_decompose": True,
                                                                   "wd_on_out": False})
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
                                         "locon.LoConModule", {"lora_dim": 4, "alpha": 2, "weight_decompose": True,
                                                                   "wd_on_out": False})
    lora = save(tensors, tmp_path / "dora.safetensors")
    loras = FlowLoras(SimpleNamespace(transformer=transformer), "flux")
    applied = loras.apply([LoraRequest(lora, "dora", unet_strength=0.5)])
    assert applied[0].mapped == 1 and not applied[0].unmapped
    state = transformer.state_dict()
    expected = fused + 0.5 * (merged - fused)  # DoRA's strength interpolates (ComfyUI)
    assert relative_error(rows_of(PARTS, state), expected) < 1e-5
    loras.restore()
    assert torch.equal(rows_of(PARTS, transformer.state_dict()), fused)


# ---- lora convert: parts → a fused single-file module, swapped halves --------------------------

# algorithms whose parts have no exact fused form (each part's delta depends on its own rows
# as a whole: a per-column norm, one input transform; input gains that differ per part)
NO_FUSED_FORM = {"dora-columns", "glora", "ia3-columns"}


def convert(source, out, to, base=None):
    from sdkit.ops.lora.convert import LoraConvertOptions, convert_transformer_lora

    return convert_transformer_lora(source, out, LoraConvertOptions(to, base=str(base) if base else None))


def part_adapters(bases, parts, algo, cls, options, present=None):
    """LyCORIS modules trained on each diffusers part (OneTrainer's names), and the
    merged weight of every part (the base's own where no module sits)."""
    tensors, merged = {}, []
    for number, part in enumerate(parts):
        weight, bias = bases.split[f"{part}.weight"], bases.split[f"{part}.bias"]
        if present is not None and number not in present:
            merged.append(weight)
            continue
        module, weights, _ = lycoris_adapter("lora_transformer_" + part.replace(".", "_"), weight, bias, cls,
                                             dict(options, lora_dim=min(options.get("lora_dim", 4), 8)), seed=number)
        tensors.update(module)
        merged.append(weights)
    return with_neighbour(bases, tensors), torch.cat(merged)


def with_neighbour(bases, tensors):
    """An adapter file also holding a plain LoRA module on another layer, as trained files do."""
    rows, columns = bases.split["x_embedder.weight"].shape
    return {**tensors, "lora_transformer_x_embedder.lora_down.weight": torch.full((2, columns), 0.01),
            "lora_transformer_x_embedder.lora_up.weight": torch.full((rows, 2), 0.01)}


@pytest.mark.parametrize("algo,cls,options", ALGORITHMS, ids=[a for a, _, _ in ALGORITHMS])
def test_part_modules_convert_to_one_fused_module_that_bakes_alike(bases, algo, cls, options, tmp_path):
    tensors, merged = part_adapters(bases, PARTS, algo, cls, options)
    lora = save(tensors, tmp_path / "parts.safetensors")
    out = tmp_path / "comfy.safetensors"
    if algo in NO_FUSED_FORM:
        with pytest.raises(SdkitError, match="lora_transformer_transformer_blocks_0_attn_to_"):
            convert(lora, out, "comfyui", bases.single_path)
        assert not out.exists()
        return
    result = convert(lora, out, "comfyui", bases.single_path)
    assert result.fused == 1 and result.modules_out == 2
    assert any(key.startswith(f"diffusion_model.{QKV}.") for key in load(out))
    baked = bake(bases.single_path, out, tmp_path / "baked.safetensors")
    assert relative_error(baked[f"{QKV}.weight"], merged) < 1e-5
    assert (algo == "lokr") == bool(result.as_differences)  # only LoKr needs a full difference


def test_oft_parts_held_by_their_norm_bound_are_refused(bases, tmp_path):
    """A bound small enough to scale each part's generators down: the fused module's one
    bound would scale all blocks by another factor."""
    tensors, _ = part_adapters(bases, PARTS, "oft", "diag_oft.DiagOFTModule", {"lora_dim": 8, "constraint": 1e-4})
    lora = save(tensors, tmp_path / "oft.safetensors")
    with pytest.raises(SdkitError, match="inside its norm bound"):
        convert(lora, tmp_path / "comfy.safetensors", "comfyui", bases.single_path)


@pytest.mark.parametrize("algo", ["loha", "dora-rows", "ia3-rows", "full", "oft"])
def test_a_part_alone_fuses_with_the_other_parts_left_alone(bases, algo, tmp_path):
    _, cls, options = next(a for a in ALGORITHMS if a[0] == algo)
    # OFT blocks of one size: k of q, k, v (its block size differs on the MLP input's rows)
    fused, parts, present = (QKV, PARTS, {1}) if algo == "oft" else (LINEAR1, LINEAR1_PARTS, {1, 3})
    tensors, merged = part_adapters(bases, parts, algo, cls, options, present=present)
    lora = save(tensors, tmp_path / "parts.safetensors")
    out = tmp_path / "comfy.safetensors"
    if algo == "dora-rows":  # a fused DoRA would renormalise q's and v's rows too
        with pytest.raises(SdkitError, match="DoRA on some parts"):
            convert(lora, out, "kohya", bases.single_path)
        return
    convert(lora, out, "kohya", bases.single_path)
    baked = bake(bases.single_path, out, tmp_path / "baked.safetensors")
    assert relative_error(baked[f"{fused}.weight"], merged) < 1e-5
    assert torch.equal(baked[f"{fused}.weight"][:32], bases.single[f"{fused}.weight"][:32])


@pytest.mark.parametrize("algo,cls,options", [a for a in ALGORITHMS if a[0] != "glora"],
                         ids=[a for a, _, _ in ALGORITHMS if a != "glora"])
def test_a_module_on_the_swapped_modulation_converts_with_its_halves_exchanged(bases, algo, cls, options, tmp_path):
    weight, bias = bases.split["norm_out.linear.weight"], bases.split["norm_out.linear.bias"]
    if algo == "oft":
        options = dict(options, lora_dim=16)  # 64 rows: two blocks per half
    tensors, merged, _ = lycoris_adapter("lora_transformer_norm_out_linear", weight, bias, cls, options)
    lora = save(with_neighbour(bases, tensors), tmp_path / "adapter.safetensors")
    out = tmp_path / "comfy.safetensors"
    result = convert(lora, out, "comfyui", bases.single_path)
    assert result.swapped == 1
    baked = bake(bases.single_path, out, tmp_path / "baked.safetensors")
    half = merged.shape[0] // 2
    expected = torch.cat([merged[half:], merged[:half]])
    assert relative_error(baked["final_layer.adaLN_modulation.1.weight"], expected) < 1e-5


# ---- lora convert: DoRA in the diffusers layout (peft's magnitude vectors) -----------------------

DORA_ROWS = {"lora_dim": 4, "alpha": 2, "weight_decompose": True}
# single-file layers and their diffusers parts: fused, renamed, swapped
DORA_LAYERS = {QKV: PARTS, "double_blocks.0.img_attn.proj": ["transformer_blocks.0.attn.to_out.0"],
               "final_layer.adaLN_modulation.1": ["norm_out.linear"]}


def test_a_kohya_dora_converts_to_peft_magnitudes_diffusers_fuses_alike(bases, tmp_path):
    """Fused, renamed and swapped DoRA layers written for peft (`lora_magnitude_vector`,
    `use_dora` in the config): diffusers loads the file and its `fuse_lora` gives each
    part the rows of the merged weight LyCORIS computes on the whole single-file layer."""
    import diffusers

    tensors, expected = {}, {}
    for seed, (layer, parts) in enumerate(DORA_LAYERS.items()):
        weight, bias = bases.single[f"{layer}.weight"], bases.single[f"{layer}.bias"]
        module, merged, _ = lycoris_adapter("lora_unet_" + layer.replace(".", "_"), weight, bias,
                                            "locon.LoConModule", DORA_ROWS, seed=seed)
        tensors.update(module)
        if layer.startswith("final_layer"):
            half = merged.shape[0] // 2
            merged = torch.cat([merged[half:], merged[:half]])
        expected.update(zip(parts, merged.split(32 if len(parts) > 1 else merged.shape[0])))
    kohya = save(tensors, tmp_path / "kohya.safetensors")
    out = tmp_path / "peft.safetensors"
    result = convert(kohya, out, "diffusers", bases.single_path)
    assert result.split == 1 and result.swapped == 1
    assert any(key.endswith(".lora_magnitude_vector") for key in load(out))
    class_name, config, _ = TINY["flux"]
    model = getattr(diffusers, class_name)(**config).eval()
    model.load_state_dict(bases.split)
    model.load_lora_adapter(str(out), prefix="transformer", adapter_name="x")
    model.fuse_lora(adapter_names=["x"])
    fused = {name.replace(".base_layer.", "."): value for name, value in model.state_dict().items()
             if "lora_" not in name}
    for part, merged in expected.items():
        assert relative_error(fused[f"{part}.weight"], merged) < 1e-5, part
    back = tmp_path / "comfy.safetensors"  # peft's magnitude vectors back to fused kohya DoRA
    assert convert(out, back, "comfyui", bases.single_path).fused == 1
    baked = bake(bases.split_path, back, tmp_path / "baked.safetensors")
    for part, merged in expected.items():
        assert relative_error(baked[f"{part}.weight"], merged) < 1e-5, part


def test_a_dora_only_peft_cannot_hold_is_refused_in_one_line(bases, tmp_path):
    weight, bias = bases.single[f"{QKV}.weight"], bases.single[f"{QKV}.bias"]
    columns, _, _ = lycoris_adapter("lora_unet_double_blocks_0_img_attn_qkv", weight, bias, "locon.LoConModule",
                                    dict(DORA_ROWS, wd_on_out=False))
    with pytest.raises(SdkitError, match="lora_unet_double_blocks_0_img_attn_qkv: its DoRA norm runs over input"):
        convert(save(columns, tmp_path / "columns.safetensors"), tmp_path / "a.safetensors", "diffusers")
    rows, _, _ = lycoris_adapter("lora_unet_double_blocks_0_img_attn_qkv", weight, bias, "locon.LoConModule", DORA_ROWS)
    mixed = save(with_neighbour(bases, rows), tmp_path / "mixed.safetensors")
    with pytest.raises(SdkitError, match="peft's config turns DoRA on or off"):
        convert(mixed, tmp_path / "b.safetensors", "diffusers", bases.single_path)
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_family_bakes_a_fused_dora_into_its_split_parts(family, tmp_path):
    single = tiny_tensors(family, "ldm")
    split = converted(single, "ldm_to_diffusers")
    spread = [t for t in index(split).targets if len({piece.weight.key for piece in t.pieces}) > 1]
    if not spread:
        pytest.skip(f"no {family} layer is fused in one convention and split in the other")
    target = spread[0]
    weight, bias = single[f"{target.ldm_path}.weight"], single.get(f"{target.ldm_path}.bias")
    tensors, merged, _ = lycoris_adapter("lora_unet_" + target.ldm_path.replace(".", "_"), weight, bias,
                                         "locon.LoConModule", dict(DORA_ROWS, wd_on_out=False))
    lora = save(tensors, tmp_path / "dora.safetensors")
    baked = bake(save(split, tmp_path / "split.safetensors"), lora, tmp_path / "baked.safetensors")
    for piece in target.pieces:
        first, last = piece.delta_rows
        assert relative_error(baked[piece.weight.key], merged[first:last]) < 1e-5, piece.weight.key


def test_the_command_refuses_a_part_without_fused_form_in_one_line(bases, capsys, tmp_path):
    from cli_run import run_sdkit

    from sdkit.cli import lora_cmd  # noqa: F401  (attaches `lora` to the group)

    _, cls, options = next(a for a in ALGORITHMS if a[0] == "glora")
    tensors, _ = part_adapters(bases, PARTS, "glora", cls, options)
    lora = save(tensors, tmp_path / "glora.safetensors")
    out = tmp_path / "comfy.safetensors"
    code, _out, err = run_sdkit(capsys, "lora", "convert", str(lora), "--to", "comfyui", "--base",
                                str(bases.single_path), "-o", str(out))
    assert code == 1 and not out.exists()
    assert err.startswith("sdkit: error: lora_transformer_transformer_blocks_0_attn_to_") and err.count("\n") == 1, err
    assert "no fused form" in err
