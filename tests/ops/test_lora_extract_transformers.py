"""`sdkit lora extract` on transformer denoisers (tiny FLUX.1 and SD3 from diffusers' own
model-test configs): TUNED is BASE plus a known rank-2 delta on every matrix of the
repeated blocks (the layers sd-scripts' `flux_extract_lora.py` takes: the double and
single blocks' weights, SD3's joint blocks). Extracted at rank 4 without a clamp, the LoRA
must hold that delta: sdkit's bake of it into BASE gives TUNED, diffusers (peft's
`load_lora_adapter` + `fuse_lora`) loads the diffusers layout to TUNED, `lora check` maps
every module, and the factors of an extract from fp8 and GGUF bases multiply to the delta
added to the values those files stand for (read here with torch and `gguf`)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from cli_run import exit_code, run_sdkit
from safetensors import safe_open
from test_lora_quantized import values_of, wide_flux
from test_lora_support import single_thread  # noqa: F401  (autouse)
from transformer_loras import assert_close, converted, load, save

from fixtures.families.released import TINY, tiny_tensors
from sdkit.cli import lora_cmd  # noqa: F401  (attaches `lora` to the group)
from sdkit.errors import SdkitError
from sdkit.ops.lora.bake import AdapterInput, bake_loras
from sdkit.ops.lora.extract import ExtractOptions, extract_lora

DELTA_RANK = 2
EXACT = {"rank": 4, "clamp_quantile": None}
# the single-file names of the repeated blocks' matrices (sd-scripts' FLUX filter: a
# `double_blocks` / `single_blocks` key, no bias, no norm; SD3's MMDiT blocks)
BLOCKS = {"flux": r"(double|single)_blocks\.\d+\.", "sd3": r"joint_blocks\.\d+\."}
FAMILIES = list(BLOCKS)


def diffusers_model(family: str, seed: int = 0, **changes):
    import diffusers

    class_name, config, _ = TINY[family]
    torch.manual_seed(seed)
    return getattr(diffusers, class_name)(**dict(config, **changes)).eval()


def with_delta(single: dict[str, torch.Tensor], family: str, seed: int = 1,
               blocks: str | None = None) -> dict[str, torch.Tensor]:
    """`single` plus a random rank-2 matrix on every block matrix (of `blocks`)."""
    generator = torch.Generator().manual_seed(seed)
    tuned = {}
    for name, value in single.items():
        if value.dim() == 2 and re.match(blocks or BLOCKS[family], name) and "norm" not in name:
            up = torch.randn(value.shape[0], DELTA_RANK, generator=generator) * 0.1
            down = torch.randn(DELTA_RANK, value.shape[1], generator=generator) * 0.1
            value = value + up @ down
        tuned[name] = value
    return tuned


@pytest.fixture(scope="module", params=FAMILIES)
def models(request, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    base = {name: value.clone() for name, value in diffusers_model(family).state_dict().items()}
    single = converted(base, "diffusers_to_ldm")
    tuned = with_delta(single, family)
    return {"family": family, "dir": folder, "tuned_values": tuned,
            "base_single": save(single, folder / "base.safetensors"),
            "base_diffusers": save(base, folder / "base-diffusers.safetensors"),
            "tuned_single": save(tuned, folder / "tuned.safetensors"),
            "tuned_diffusers": save(converted(tuned, "ldm_to_diffusers"), folder / "tuned-diffusers.safetensors")}


def extracted(models, to: str, tuned: str = "single", base: str = "single", **options):
    out = models["dir"] / f"{to}-{tuned}-{base}-{len(options)}.safetensors"
    extract_lora(models[f"tuned_{tuned}"], models[f"base_{base}"], out, ExtractOptions(**EXACT, to=to, **options),
                 overwrite=True)
    return out


def baked_single(models, lora, tmp_path) -> dict[str, torch.Tensor]:
    out = tmp_path / "baked.safetensors"
    bake_loras(models["base_single"], [AdapterInput(str(lora))], out)
    return load(out)


@pytest.mark.parametrize("to", ["comfyui", "kohya", "diffusers"])
@pytest.mark.parametrize("tuned, base", [("single", "single"), ("diffusers", "single"), ("single", "diffusers")])
def test_extract_then_bake_gives_the_tuned_model(models, to, tuned, base, tmp_path):
    lora = extracted(models, to, tuned, base)
    assert_close(baked_single(models, lora, tmp_path), models["tuned_values"])


def test_fused_layers_are_one_module_in_single_file_layouts_and_parts_in_diffusers(models):
    comfyui, diffusers = load(extracted(models, "comfyui")), load(extracted(models, "diffusers"))
    if models["family"] == "flux":
        assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight" in comfyui
        assert "diffusion_model.single_blocks.0.linear1.lora_up.weight" in comfyui
        parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        assert all(f"transformer.single_transformer_blocks.0.{p}.lora_B.weight" in diffusers for p in parts)
    else:
        assert "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.weight" in comfyui
        assert "transformer.transformer_blocks.0.attn.to_k.lora_B.weight" in diffusers
    assert not any("qkv" in name or "linear1" in name for name in diffusers)


@pytest.mark.parametrize("to", ["comfyui", "kohya", "diffusers"])
def test_check_maps_every_module(models, to, capsys):
    lora = extracted(models, to)
    for base in ("base_single", "base_diffusers"):
        code, out, _ = run_sdkit(capsys, "lora", "check", str(models[base]), str(lora), "--json")
        report = json.loads(out)
        assert code == 0 and report["verdict"] == "all" and report["unmapped"] == {}, report
        assert report["mapped"] == report["modules"] > 0 and report["base_family"] == models["family"]


def test_diffusers_loads_the_diffusers_layout_to_the_tuned_model(models):
    from peft.utils import get_peft_model_state_dict

    lora = extracted(models, "diffusers", "diffusers", "diffusers")
    model = diffusers_model(models["family"])
    model.load_lora_adapter(str(lora), prefix="transformer", adapter_name="x")
    loaded = {f"transformer.{k}" for k in get_peft_model_state_dict(model, adapter_name="x")}
    assert loaded == set(load(lora))
    model.fuse_lora(adapter_names=["x"])
    fused = {name.replace(".base_layer.", "."): value for name, value in model.state_dict().items()
             if "lora_" not in name}
    assert_close(fused, converted(models["tuned_values"], "ldm_to_diffusers"))


def test_kohya_output_carries_sd_scripts_metadata(models):
    with safe_open(str(extracted(models, "kohya")), "pt") as handle:
        metadata = handle.metadata()
    expected_module = {"flux": "networks.lora_flux", "sd3": "networks.lora_sd3"}[models["family"]]
    assert metadata["ss_network_module"] == expected_module
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4.0"
    assert metadata["modelspec.architecture"] != "unknown" and "sdkit.recipe" in metadata
    if models["family"] == "flux":
        assert metadata["ss_base_model_version"] == "flux1"  # sd-scripts' flux_utils.MODEL_VERSION_FLUX_V1


def test_full_diff_keeps_biases_and_embedders(tmp_path):
    """Without the flag a changed bias and embedder are reported and left out; with it the
    bake gives them back (`diff_b` beside a block's LoRA, `diff` / `diff_b` modules)."""
    single = converted(diffusers_model("flux").state_dict(), "diffusers_to_ldm")
    tuned = with_delta(single, "flux")
    for name in ("img_in.weight", "img_in.bias", "double_blocks.0.img_attn.qkv.bias"):
        tuned[name] = tuned[name] + 0.25
    base, tuned_path = save(single, tmp_path / "base.safetensors"), save(tuned, tmp_path / "tuned.safetensors")
    plain = extract_lora(tuned_path, base, tmp_path / "plain.safetensors", ExtractOptions(**EXACT))
    assert any("3 other tensors differ" in note for note in plain.notes)
    out = tmp_path / "full.safetensors"
    extract_lora(tuned_path, base, out, ExtractOptions(**EXACT, full_diff=True))
    written = load(out)
    assert "diffusion_model.img_in.diff" in written and "diffusion_model.img_in.diff_b" in written
    assert "diffusion_model.double_blocks.0.img_attn.qkv.diff_b" in written
    bake_loras(base, [AdapterInput(str(out))], tmp_path / "baked.safetensors")
    assert_close(load(tmp_path / "baked.safetensors"), tuned)


@pytest.mark.parametrize("kind, args", [
    ("scaled", ("--dtype", "fp8_e4m3fn", "--fp8-scaling", "scaled")),
    ("plain", ("--dtype", "fp8_e4m3fn", "--fp8-scaling", "plain")),
    ("Q8_0", ("--to", "gguf", "--quant", "Q8_0")),
])
def test_quantized_base_is_read_as_its_values(kind, args, tmp_path):
    """BASE stored in fp8 / GGUF, TUNED = the values it stands for + the delta (float32):
    the factors multiply to the delta."""
    plain = wide_flux()
    source = save(plain, tmp_path / "bf16.safetensors")
    base = tmp_path / ("base.gguf" if kind == "Q8_0" else "base.safetensors")
    assert exit_code(["convert", str(source), "-o", str(base), *args]) == 0
    values = {name: value for name, value in values_of(base).items() if name in plain}  # no scales
    tuned = with_delta(values, "flux")
    out = tmp_path / "lora.safetensors"
    extract_lora(save(tuned, tmp_path / "tuned.safetensors"), base, out, ExtractOptions(**EXACT, to="kohya", dtype="fp32"))
    lora = load(out)
    changed = [name for name in tuned if not torch.equal(tuned[name], values[name])]
    assert changed
    for name in changed:
        module = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
        product = lora[f"{module}.lora_up.weight"].float() @ lora[f"{module}.lora_down.weight"].float()
        torch.testing.assert_close(product, tuned[name] - values[name], rtol=0, atol=1e-5, msg=name)


def test_other_family_or_size_is_refused_with_the_first_differing_key(models, tmp_path, capsys):
    other_family = "sd3" if models["family"] == "flux" else "flux"
    other = save(diffusers_model(other_family).state_dict(), tmp_path / "other.safetensors")
    bigger = save(diffusers_model(models["family"], num_layers=2).state_dict(), tmp_path / "bigger.safetensors")
    out = tmp_path / "lora.safetensors"
    for tuned, words in ((other, "the base is"), (bigger, "transformer_blocks.1.")):
        code, _, err = run_sdkit(capsys, "lora", "extract", str(tuned), str(models["base_diffusers"]), "-o", str(out))
        assert code == 1 and err.startswith("sdkit: error:") and words in err and err.count("\n") == 1, err
        assert not out.exists()
    with pytest.raises(SdkitError, match="--to must be one of"):
        extract_lora(models["tuned_single"], models["base_single"], out, ExtractOptions(to="bogus"))


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_family_round_trips_in_every_layout(family, tmp_path):
    """Each family's single-file model (random weights, `fixtures.families.released`) with a
    rank-2 delta on every matrix of its repeated blocks (the block lists its layouts count):
    every layout bakes back to TUNED."""
    from sdkit.arch.families import FAMILIES

    single = {name: value.float().contiguous() for name, value in tiny_tensors(family, "ldm").items()}
    blocks = [pattern for layout in FAMILIES[family].layouts for pattern in layout.counts.values()]
    tuned = with_delta(single, family, blocks="|".join(f"(?:{pattern})" for pattern in blocks))
    base, tuned_path = save(single, tmp_path / "base.safetensors"), save(tuned, tmp_path / "tuned.safetensors")
    changed = sum(not torch.equal(single[name], tuned[name]) for name in single)
    for to in ("comfyui", "kohya", "diffusers"):
        out = tmp_path / f"{to}.safetensors"
        report = extract_lora(tuned_path, base, out, ExtractOptions(**EXACT, to=to))
        assert len(report.layers) == changed
        bake_loras(base, [AdapterInput(str(out))], tmp_path / f"{to}-baked.safetensors")
        assert_close(load(tmp_path / f"{to}-baked.safetensors"), tuned)


def test_randomized_extract_checks_the_smallest_layer_against_the_full_svd(models, tmp_path):
    report = extract_lora(models["tuned_single"], models["base_single"], tmp_path / "lora.safetensors",
                          ExtractOptions(**EXACT, randomized=True))
    assert len(report.randomized_check) == 1
    check = report.randomized_check[0]
    assert check["error_randomized"] <= check["error_full_svd"] + 1e-4 < 1e-3  # rank 4 ≥ the change's 2
    sizes = {name: tuple(value.shape) for name, value in models["tuned_values"].items()}
    block_sizes = {"lora_unet_" + name[: -len(".weight")].replace(".", "_"): shape[0] * shape[1]
                   for name, shape in sizes.items()
                   if len(shape) == 2 and re.match(BLOCKS[models["family"]], name) and "norm" not in name}
    assert block_sizes[check["layer"]] == min(block_sizes.values())
