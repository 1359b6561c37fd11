"""Baking kohya-named adapters: alpha ≠ rank, LDM- and diffusers-style UNet names,
SDXL text encoders with OpenCLIP's fused q|k|v, block and component selection, bias
deltas, family refusal, metadata, and the `sdkit lora check` / `bake` commands."""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdkit.adapters import lora_math
from sdkit.adapters.lora_format import parse_lora
from sdkit.cli import lora_cmd  # noqa: F401  (attaches `lora` to the group)
from sdkit.cli.main import main
from sdkit.errors import SdkitError
from sdkit.io import hash_file
from sdkit.ops.lora import compute as bake_compute
from sdkit.ops.lora.bake import AdapterInput, BakeOptions, bake_loras, key_baker
from sdkit.ops.adapter_input import parse_adapter_arg
from sdkit.ops.lora.plan import check_adapter, open_base, plan_bake
from test_lora_support import single_thread  # noqa: F401  (autouse)
from test_lora_support import (configs, kohya_lora, lora_delta, save_folder, save_ldm, tiny_pipeline, write)

UNET = "model.diffusion_model."
SD1_TEXT = "cond_stage_model.transformer."
ATTENTION = re.compile(r"^model\.diffusion_model\.(.+\.(to_q|to_k|to_v|to_out\.0|proj_in|ff\.net\.2))\.weight$")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("sd1")
    pipe = tiny_pipeline("sd1")
    single = save_ldm(pipe, folder / "base.safetensors")
    return {"pipe": pipe, "single": single, "tensors": load_file(str(single)),
            "folder": save_folder(pipe, folder / "base"), "dir": folder}


def ldm_unet_modules(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(LDM module path, kohya name after it, weight shape) of the UNet attention layers."""
    out = []
    for key, value in tensors.items():
        match = ATTENTION.match(key)
        if match:
            out.append((match.group(1), "lora_unet_" + match.group(1).replace(".", "_"), tuple(value.shape)))
    return sorted(out)


def test_kohya_alpha_differs_from_rank(sd1, tmp_path):
    modules = ldm_unet_modules(sd1["tensors"])
    text = [(f"lora_te_text_model_encoder_layers_{n}_self_attn_{p}_proj",
             f"{SD1_TEXT}text_model.encoder.layers.{n}.self_attn.{p}_proj.weight") for n in (0, 1) for p in "qv"]
    state = kohya_lora([(name, shape) for _, name, shape in modules]
                       + [(name, tuple(sd1["tensors"][key].shape)) for name, key in text], rank=4, alpha=1.5)
    lora = write(tmp_path / "kohya.safetensors", state, {"ss_network_module": "networks.lora"})
    out = tmp_path / "baked.safetensors"
    result = bake_loras(sd1["single"], [AdapterInput(str(lora), 0.6)], out)
    assert result.adapters[0].mapped == len(modules) + len(text)
    baked = load_file(str(out))
    for path, name, _ in modules:
        key = f"{UNET}{path}.weight"
        expected = sd1["tensors"][key] + 0.6 * lora_delta(state, name).reshape(sd1["tensors"][key].shape)
        torch.testing.assert_close(baked[key], expected, rtol=1e-5, atol=1e-6)
    for name, key in text:
        torch.testing.assert_close(baked[key], sd1["tensors"][key] + 0.6 * lora_delta(state, name),
                                   rtol=1e-5, atol=1e-6)
    untouched = f"{UNET}input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(baked[untouched], sd1["tensors"][untouched])


def test_a_product_made_in_chunks_bakes_the_bits_of_the_whole_delta(sd1, tmp_path, monkeypatch):
    # chunks of a few rows that straddle the elementwise blocks: the bake must add the
    # same float32 delta that lora_math (and so the sampler's runtime LoRA) forms
    monkeypatch.setattr(lora_math, "PRODUCT_ELEMENTS", 200)
    monkeypatch.setattr(bake_compute, "_BLOCK_ELEMENTS", 300)
    modules = ldm_unet_modules(sd1["tensors"])
    state = kohya_lora([(name, shape) for _, name, shape in modules], rank=4, alpha=3.0)
    lora = write(tmp_path / "kohya.safetensors", state, {"ss_network_module": "networks.lora"})
    out = tmp_path / "baked.safetensors"
    bake_loras(sd1["single"], [AdapterInput(str(lora), 0.7)], out)
    baked, parsed = load_file(str(out)), parse_lora(load_file(str(lora)))
    for path, name, _ in modules:
        base = sd1["tensors"][f"{UNET}{path}.weight"]
        assert base.shape[0] * base[0].numel() > 200  # in chunks indeed
        delta, _ = lora_math.delta_weight(parsed.modules[name], base, 0.7)
        assert torch.equal(baked[f"{UNET}{path}.weight"], (base.float() + delta.reshape(base.shape)).to(base.dtype))


def test_a_key_costs_its_output_and_the_float32_deltas_held_while_computing_it(sd1, tmp_path, monkeypatch):
    # the writer computes keys ahead within a byte budget by this cost: a plain LoRA's
    # delta is held a chunk at a time, a LoHa's whole
    monkeypatch.setattr(bake_compute, "PRODUCT_ELEMENTS", 64)
    (plain_path, plain, shape), (hada_path, hadamard, hada_shape) = ldm_unet_modules(sd1["tensors"])[:2]
    state = kohya_lora([(plain, shape)], rank=4, alpha=4.0)
    generator = torch.Generator().manual_seed(1)
    for half in ("w1", "w2"):
        state[f"{hadamard}.hada_{half}_a"] = torch.randn(hada_shape[0], 2, generator=generator)
        state[f"{hadamard}.hada_{half}_b"] = torch.randn(2, hada_shape[1], generator=generator)
    lora = write(tmp_path / "mixed.safetensors", state)
    with ExitStack() as stack:
        plan = plan_bake(open_base(str(sd1["single"]), stack), [AdapterInput(str(lora), 1.0)], stack)
        baker = key_baker(plan, "fp16")
        costs = {name: baker.cost(name) for name in baker.codes}
    assert costs.keys() == {f"{UNET}{plain_path}.weight", f"{UNET}{hada_path}.weight"}
    for path, layer_shape in ((plain_path, shape), (hada_path, hada_shape)):
        output = 2 * layer_shape[0] * layer_shape[1]
        held = 4 * (64 + layer_shape[1]) if path == plain_path else 2 * output
        assert costs[f"{UNET}{path}.weight"] == output + held


def test_ldm_and_diffusers_unet_names_bake_the_same(sd1, tmp_path):
    """kohya SD1 files name UNet layers after diffusers paths, SDXL ones after LDM paths:
    both spellings reach the same layers, on a single file and on a diffusers folder."""
    ldm_modules = ldm_unet_modules(sd1["tensors"])
    ldm_state = kohya_lora([(name, shape) for _, name, shape in ldm_modules], rank=2, alpha=2)
    diffusers_names = _diffusers_names_by_weight(sd1["pipe"])
    renamed = {}
    for path, name, _ in ldm_modules:
        other = diffusers_names[_fingerprint(sd1["tensors"][f"{UNET}{path}.weight"])]
        renamed.update({key.replace(name + ".", other + "."): value
                        for key, value in ldm_state.items() if key.startswith(name + ".")})
    assert set(renamed) != set(ldm_state)
    a = write(tmp_path / "ldm_names.safetensors", ldm_state)
    b = write(tmp_path / "diffusers_names.safetensors", renamed)
    outputs = {}
    for label, lora in (("ldm", a), ("diffusers", b)):
        for base in ("single", "folder"):
            out = tmp_path / f"{label}-{base}" if base == "folder" else tmp_path / f"{label}.safetensors"
            result = bake_loras(sd1[base], [AdapterInput(str(lora))], out)
            assert result.adapters[0].mapped == len(ldm_modules), result.adapters[0].unmapped
            outputs[(label, base)] = out
    assert _same_file_tensors(outputs[("ldm", "single")], outputs[("diffusers", "single")])
    for component in ("unet/diffusion_pytorch_model", "text_encoder/model"):
        assert _same_file_tensors(outputs[("ldm", "folder")] / f"{component}.safetensors",
                                  outputs[("diffusers", "folder")] / f"{component}.safetensors")


def _fingerprint(tensor: torch.Tensor) -> bytes:
    return tensor.detach().float().flatten().numpy().tobytes()


def _diffusers_names_by_weight(pipe) -> dict[bytes, str]:
    """kohya names after diffusers paths, found by the layer's (random, unique) weight."""
    return {_fingerprint(layer.weight): "lora_unet_" + name.replace(".", "_")
            for name, layer in pipe.unet.named_modules() if getattr(layer, "weight", None) is not None}


def _same_file_tensors(a: Path, b: Path) -> bool:
    first, second = load_file(str(a)), load_file(str(b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("sdxl")
    pipe = tiny_pipeline("sdxl")
    single = save_ldm(pipe, folder / "base.safetensors")
    return {"pipe": pipe, "single": single, "tensors": load_file(str(single)),
            "folder": save_folder(pipe, folder / "base")}


def _sdxl_text_lora(pipe) -> dict[str, torch.Tensor]:
    modules = []
    for prefix, encoder in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        for name, layer in encoder.named_modules():
            if re.search(r"self_attn\.(q|k|v|out)_proj$|mlp\.fc1$", name):
                path = name if name.startswith("text_model.") else "text_model." + name
                modules.append((prefix + path.replace(".", "_"), tuple(layer.weight.shape)))
    return kohya_lora(modules, rank=3, alpha=1.0, seed=5)


def test_sdxl_text_encoders_land_in_the_fused_thirds(sdxl, tmp_path):
    state = _sdxl_text_lora(sdxl["pipe"])
    lora = write(tmp_path / "te.safetensors", state, {"ss_base_model_version": "sdxl_base_v1-0"})
    single = bake_loras(sdxl["single"], [AdapterInput(str(lora), 0.9)], tmp_path / "single.safetensors")
    folder = bake_loras(sdxl["folder"], [AdapterInput(str(lora), 0.9)], tmp_path / "folder")
    assert single.adapters[0].mapped == folder.adapters[0].mapped == len(state) // 3
    assert single.adapters[0].by_component == {"text_encoder": 10, "text_encoder_2": 10}
    baked = load_file(str(tmp_path / "single.safetensors"))
    # the folder's result converted to the single-file layout is the same model
    from sdkit.arch.keymaps import checkpoint_to_ldm, convert_state_dict
    from test_lora_support import read_folder

    folder_tensors = read_folder(tmp_path / "folder")
    converted = convert_state_dict(checkpoint_to_ldm(folder_tensors, configs(sdxl["pipe"])).plan, folder_tensors)
    for key, value in baked.items():
        torch.testing.assert_close(value, converted[key], rtol=1e-6, atol=1e-7, msg=key)
    # and k's third of layer 1's in_proj holds exactly the k_proj delta
    key = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    width = baked[key].shape[1]
    before, after = sdxl["tensors"][key], baked[key]
    delta = 0.9 * lora_delta(state, "lora_te2_text_model_encoder_layers_1_self_attn_k_proj")
    torch.testing.assert_close(after[width:2 * width], before[width:2 * width] + delta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[:width], before[:width] + 0.9 * lora_delta(
        state, "lora_te2_text_model_encoder_layers_1_self_attn_q_proj"), rtol=1e-5, atol=1e-6)


def test_wrong_family_is_refused_unless_allowed(sd1, sdxl, tmp_path):
    state = _sdxl_text_lora(sdxl["pipe"])
    lora = write(tmp_path / "xl.safetensors", state, {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(SdkitError, match=r"made for sdxl-base, the base is sd1 "
                                         r"\(--allow-family-mismatch bakes it anyway\)"):
        bake_loras(sd1["single"], [AdapterInput(str(lora))], tmp_path / "no.safetensors")
    assert not (tmp_path / "no.safetensors").exists()
    forced = bake_loras(sd1["single"], [AdapterInput(str(lora))], tmp_path / "forced.safetensors",
                        BakeOptions(allow_family_mismatch=True))
    report = forced.adapters[0]
    assert report.family_problem and report.mapped == 10  # lora_te1_ layers fit the sd1 encoder
    assert all("text_encoder_2" in reason for reason in report.unmapped.values())
    check = check_adapter(str(sd1["single"]), str(lora))
    assert not check["family_match"] and check["base_family"] == "sd1" and check["family"] == "sdxl-base"


def test_blocks_components_and_biases(sd1, tmp_path):
    modules = ldm_unet_modules(sd1["tensors"])
    state = kohya_lora([(name, shape) for _, name, shape in modules], rank=2, alpha=2)
    state.update(kohya_lora([("lora_te_text_model_encoder_layers_0_mlp_fc1",
                              tuple(sd1["tensors"][f"{SD1_TEXT}text_model.encoder.layers.0.mlp.fc1.weight"].shape))],
                            rank=2, alpha=2))
    proj_in = "lora_unet_input_blocks_1_1_proj_in"
    state[f"{proj_in}.diff_b"] = torch.ones(sd1["tensors"][f"{UNET}input_blocks.1.1.proj_in.bias"].shape)
    to_q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    state[f"{to_q}.diff_b"] = torch.ones(32)
    lora = write(tmp_path / "l.safetensors", state)
    out = tmp_path / "b.safetensors"
    result = bake_loras(sd1["single"], [AdapterInput(str(lora))], out,
                        BakeOptions(blocks="IN01:0.5,OUT03:0", components="unet"))
    report = result.adapters[0]
    assert report.dropped_biases == [to_q]  # attention q has no bias
    assert report.skipped["lora_te_text_model_encoder_layers_0_mlp_fc1"] == "text_encoder left out"
    assert all(name.startswith("lora_unet_output_blocks_3_") for name, why in report.skipped.items()
               if why == "block weight 0")
    baked, base = load_file(str(out)), sd1["tensors"]
    key = f"{UNET}input_blocks.1.1.proj_in"
    torch.testing.assert_close(baked[key + ".weight"],
                               base[key + ".weight"] + 0.5 * lora_delta(state, proj_in).reshape(base[key + ".weight"].shape))
    torch.testing.assert_close(baked[key + ".bias"], base[key + ".bias"] + 0.5)
    for name in baked:
        if name.startswith((f"{UNET}output_blocks.3.", SD1_TEXT)):
            assert torch.equal(baked[name], base[name]), name


def test_metadata_records_the_recipe(sd1, tmp_path):
    modules = ldm_unet_modules(sd1["tensors"])[:3]
    lora = write(tmp_path / "l.safetensors", kohya_lora([(n, s) for _, n, s in modules], rank=2, alpha=1))
    out = tmp_path / "b.safetensors"
    bake_loras(sd1["single"], [AdapterInput(str(lora), 0.25), AdapterInput(str(lora), 0.5)], out,
               BakeOptions(dtype="fp16"))
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} <= {"F16", "I64"}
    recipe = json.loads(metadata["sdkit.recipe"])
    assert recipe["operation"] == "lora-bake"
    assert [item["sha256"] for item in recipe["inputs"]] == [hash_file(sd1["single"]).sha256] + \
        [hash_file(lora).sha256] * 2
    assert recipe["parameters"]["strengths"] == [0.25, 0.5] and recipe["parameters"]["dtype"] == "fp16"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert metadata["modelspec.title"] == "b"


def test_adapter_argument_syntax():
    assert parse_adapter_arg("a.safetensors:0.5") == AdapterInput("a.safetensors", 0.5)
    assert parse_adapter_arg("a.safetensors") == AdapterInput("a.safetensors", 1.0)
    assert parse_adapter_arg(r"C:\loras\a.safetensors") == AdapterInput(r"C:\loras\a.safetensors", 1.0)
    assert parse_adapter_arg("dir:x/a.safetensors:-1") == AdapterInput("dir:x/a.safetensors", -1.0)


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(["lora", *args])
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_and_bake_commands(sd1, sdxl, tmp_path, capsys):
    modules = ldm_unet_modules(sd1["tensors"])
    lora = write(tmp_path / "l.safetensors", kohya_lora([(n, s) for _, n, s in modules], rank=2, alpha=1)
                 | {"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4),
                    "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2)})
    code, out, _ = run(capsys, "check", str(sd1["single"]), str(lora), "--json")
    report = json.loads(out)
    assert code == 0 and report["mapped"] == len(modules)
    assert report["unmapped"] == {"lora_unet_no_such_layer": "no layer no_such_layer in the base's unet"}
    xl = write(tmp_path / "xl.safetensors", _sdxl_text_lora(sdxl["pipe"]), {"ss_base_model_version": "sdxl_base_v1-0"})
    code, out, _ = run(capsys, "check", str(sd1["single"]), str(xl))
    assert code == 1 and "NO:" in out and "sdxl-base" in out
    target = tmp_path / "baked.safetensors"
    code, out, _ = run(capsys, "bake", str(sd1["single"]), f"{lora}:0.5", "-o", str(target), "--json")
    assert code == 0 and json.loads(out)["adapters"][0]["strength"] == 0.5 and target.is_file()
    code, _, err = run(capsys, "bake", str(sd1["single"]), str(xl), "-o", str(tmp_path / "x.safetensors"))
    assert code == 1 and err.startswith("sdkit: error:") and "--allow-family-mismatch" in err
    # --force overwrites an output; it does not accept another family
    code, _, err = run(capsys, "bake", str(sd1["single"]), str(xl), "-o", str(target), "--force")
    assert code == 1 and "--allow-family-mismatch" in err
    code, out, _ = run(capsys, "bake", str(sd1["single"]), str(xl), "-o", str(tmp_path / "x.safetensors"),
                       "--allow-family-mismatch", "--json")
    assert code == 0 and json.loads(out)["adapters"][0]["family_problem"]
    code, _, err = run(capsys, "bake", str(sd1["single"]), str(xl), "-o", str(tmp_path / "x.safetensors"),
                       "--allow-family-mismatch")
    assert code == 1 and "already exists" in err
    code, _, err = run(capsys, "bake", str(sd1["single"]), str(lora), "-o", str(target))
    assert code == 1 and "already exists" in err


def test_output_convention_can_change(sd1, tmp_path):
    """A folder baked `--to ldm` is the single file baked as it is, and the other way round."""
    modules = ldm_unet_modules(sd1["tensors"])
    lora = write(tmp_path / "l.safetensors", kohya_lora([(n, s) for _, n, s in modules], rank=2, alpha=1))
    bake_loras(sd1["folder"], [AdapterInput(str(lora), 0.7)], tmp_path / "from_folder.safetensors",
               BakeOptions(to="ldm"))
    bake_loras(sd1["single"], [AdapterInput(str(lora), 0.7)], tmp_path / "from_single.safetensors")
    assert _same_file_tensors(tmp_path / "from_folder.safetensors", tmp_path / "from_single.safetensors")
    result = bake_loras(sd1["single"], [AdapterInput(str(lora), 0.7)], tmp_path / "as_folder",
                        BakeOptions(to="diffusers"))
    assert result.convention == "diffusers" and (tmp_path / "as_folder" / "model_index.json").is_file()
    bake_loras(sd1["folder"], [AdapterInput(str(lora), 0.7)], tmp_path / "folder")
    for component in ("unet/diffusion_pytorch_model", "text_encoder/model", "vae/diffusion_pytorch_model"):
        assert _same_file_tensors(tmp_path / "as_folder" / f"{component}.safetensors",
                                  tmp_path / "folder" / f"{component}.safetensors")
