"""`sdkit convert --dtype fp8_e4m3fn | fp8_e5m2` in the three forms ComfyUI loads.

The expected fp8 values are computed here with torch from ComfyUI's rules (scale = largest
|value| / the format's largest value; values clamped into range), independently of sdkit;
the written files are read back with safetensors and through sdkit's own quantization
reader (`inspect`), which checks scales and markers as ComfyUI's loader needs them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))

from cli_run import run_sdkit  # noqa: E402
from released import tiny_tensors  # noqa: E402

KEPT_BY_FAMILY = ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "final_layer.linear.weight",
                  "final_layer.adaLN_modulation.1.weight")


@pytest.fixture()
def flux(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = tiny_tensors("flux", "ldm")
    tensors["double_blocks.0.img_attn.qkv.weight"][0, 0] = 1000.0  # beyond e4m3fn's 448
    path = tmp_path / "flux.safetensors"
    save_file(tensors, path)
    return path, tensors


def _fp8(tensor: torch.Tensor, dtype: torch.dtype, scaled: bool) -> tuple[torch.Tensor, float]:
    largest = torch.finfo(dtype).max
    scale = float(tensor.abs().max()) / largest if scaled else 1.0
    return (tensor.float() / scale).clamp(-largest, largest).to(dtype), scale


def _convert(capsys, source: Path, output: Path, *extra: str) -> dict:
    code, out, err = run_sdkit(capsys, "convert", str(source), "-o", str(output), "--json", *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("dtype_name, dtype", [("fp8_e4m3fn", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_scaled_fp8_matches_the_scaled_rule(tmp_path, capsys, flux, dtype_name, dtype):
    source, original = flux
    result = _convert(capsys, source, tmp_path / "out.safetensors", "--dtype", dtype_name)
    written = load_file(tmp_path / "out.safetensors")
    cast = [name for name, t in written.items() if t.dtype == dtype and t.numel()]
    assert cast and result["fp8"]["cast"] == len(cast)
    for name in cast:
        values, scale = _fp8(original[name], dtype, scaled=True)
        layer = name[: -len(".weight")]
        assert written[layer + ".scale_weight"].shape == () and written[layer + ".scale_weight"].item() == \
            pytest.approx(scale, rel=1e-6)
        assert torch.equal(written[name].view(torch.uint8), values.view(torch.uint8)), name
    assert written["scaled_fp8"].dtype == dtype and written["scaled_fp8"].numel() == 0
    # the family's embedders and final layer, the vectors: untouched
    for name in KEPT_BY_FAMILY + ("double_blocks.0.img_attn.qkv.bias",):
        assert torch.equal(written[name], original[name]), name
    code, out, _err = run_sdkit(capsys, "inspect", "--json", str(tmp_path / "out.safetensors"))
    assert code == 0 and "scaled" in json.loads(out)["precision"]["label"]


def test_plain_fp8_clamps_into_range_never_nan(tmp_path, capsys, flux):
    source, original = flux
    _convert(capsys, source, tmp_path / "out.safetensors", "--dtype", "fp8_e4m3fn", "--fp8-scaling", "plain")
    written = load_file(tmp_path / "out.safetensors")
    qkv = written["double_blocks.0.img_attn.qkv.weight"]
    assert qkv.dtype == torch.float8_e4m3fn and qkv.float()[0, 0].item() == 448.0
    assert not any(t.float().isnan().any() for t in written.values() if t.is_floating_point())
    assert not any(name.endswith("scale_weight") for name in written) and "scaled_fp8" not in written
    values, _ = _fp8(original["double_blocks.0.img_mlp.0.weight"], torch.float8_e4m3fn, scaled=False)
    assert torch.equal(written["double_blocks.0.img_mlp.0.weight"].view(torch.uint8), values.view(torch.uint8))


def test_mixed_fp8_is_comfy_per_layer_quantization(tmp_path, capsys, flux):
    source, original = flux
    _convert(capsys, source, tmp_path / "out.safetensors", "--dtype", "fp8_e4m3fn", "--fp8-scaling", "mixed")
    written = load_file(tmp_path / "out.safetensors")
    with safe_open(tmp_path / "out.safetensors", "pt") as handle:
        listed = json.loads(handle.metadata()["_quantization_metadata"])["layers"]
    layers = sorted(name[: -len(".weight")] for name, t in written.items() if t.dtype == torch.float8_e4m3fn)
    assert sorted(listed) == layers and all(v == {"format": "float8_e4m3fn"} for v in listed.values())
    for layer in layers:
        assert json.loads(bytes(written[layer + ".comfy_quant"].tolist())) == {"format": "float8_e4m3fn"}
        values, scale = _fp8(original[layer + ".weight"], torch.float8_e4m3fn, scaled=True)
        assert written[layer + ".weight_scale"].item() == pytest.approx(scale, rel=1e-6)
        assert torch.equal(written[layer + ".weight"].view(torch.uint8), values.view(torch.uint8))
    code, out, _err = run_sdkit(capsys, "inspect", "--json", str(tmp_path / "out.safetensors"))
    assert code == 0 and f"mixed: {len(layers)} fp8 e4m3fn layers" in json.loads(out)["precision"]["label"]


def test_error_report_per_layer_class(tmp_path, capsys, flux):
    source, original = flux
    result = _convert(capsys, source, tmp_path / "out.safetensors", "--dtype", "fp8_e4m3fn")
    errors = result["fp8"]["errors"]
    weight = original["double_blocks.0.img_mlp.0.weight"]
    values, scale = _fp8(weight, torch.float8_e4m3fn, scaled=True)
    error = values.float() * scale - weight
    entry = errors["double_blocks.N.img_mlp.0"]
    assert entry["tensors"] == 1
    assert entry["max_abs"] == pytest.approx(float(error.abs().max()), rel=1e-5)
    assert entry["relative"] == pytest.approx(float(error.norm() / weight.norm()), rel=1e-4)
    assert 0.005 < entry["relative"] < 0.06  # e4m3fn keeps 3 mantissa bits
    assert "img_in" not in errors  # kept by the family


def test_keep_pattern_and_back_to_bf16(tmp_path, capsys, flux):
    source, original = flux
    result = _convert(capsys, source, tmp_path / "fp8.safetensors", "--dtype", "fp8_e4m3fn",
                      "--keep", "single_blocks.*")
    written = load_file(tmp_path / "fp8.safetensors")
    assert torch.equal(written["single_blocks.0.linear1.weight"], original["single_blocks.0.linear1.weight"])
    assert "single_blocks.0.linear1.weight" in result["fp8"]["kept"]
    _convert(capsys, tmp_path / "fp8.safetensors", tmp_path / "bf16.safetensors", "--dtype", "bf16")
    back = load_file(tmp_path / "bf16.safetensors")
    name = "double_blocks.0.txt_mlp.2.weight"
    layer = name[: -len(".weight")]
    expected = (written[name].float() * written[layer + ".scale_weight"]).to(torch.bfloat16)
    assert torch.equal(back[name], expected)
    assert not any(key.endswith("scale_weight") for key in back) and "scaled_fp8" not in back


def test_diffusers_names_keep_the_same_layers_and_layout_changes_with_the_cast(tmp_path, capsys, flux):
    source, _original = flux
    _convert(capsys, source, tmp_path / "d.safetensors", "--to", "diffusers", "--dtype", "fp8_e4m3fn")
    written = load_file(tmp_path / "d.safetensors")
    assert written["x_embedder.weight"].dtype == torch.float32  # img_in, kept by the family
    assert written["proj_out.weight"].dtype == torch.float32  # final_layer.linear
    assert written["single_transformer_blocks.0.proj_out.weight"].dtype == torch.float8_e4m3fn
    assert written["transformer_blocks.0.attn.to_q.weight"].dtype == torch.float8_e4m3fn

    diffusers = tiny_tensors("flux", "diffusers")
    save_file(diffusers, tmp_path / "diffusers.safetensors")
    _convert(capsys, tmp_path / "diffusers.safetensors", tmp_path / "d8.safetensors", "--dtype", "fp8_e4m3fn")
    again = load_file(tmp_path / "d8.safetensors")
    assert again["x_embedder.weight"].dtype == torch.float32
    assert again["time_text_embed.timestep_embedder.linear_1.weight"].dtype == torch.float32
    assert again["transformer_blocks.0.ff.net.2.weight"].dtype == torch.float8_e4m3fn


def test_a_vae_is_not_cast_to_fp8(tmp_path, capsys):
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).save_pretrained(tmp_path / "vae")
    code, _out, err = run_sdkit(capsys, "convert", str(tmp_path / "vae"), "--dtype", "fp8_e4m3fn",
                                "-o", str(tmp_path / "vae8.safetensors"))
    assert code == 1 and "is a VAE; fp8 is for diffusion models and text encoders" in err
    assert not (tmp_path / "vae8.safetensors").exists()


def _family_with_keep_and_map() -> list[str]:
    from released import TINY

    from sdkit.arch.families import FAMILIES

    return [name for name in TINY if FAMILIES[name].fp8_keep and FAMILIES[name].key_map is not None]


@pytest.mark.parametrize("family", _family_with_keep_and_map())
def test_family_keeps_the_same_layers_in_both_conventions(tmp_path, capsys, family):
    """The family's kept modules (written in single-file names) stay in their precision
    whichever names the file uses; every other matrix becomes fp8."""
    import re

    from sdkit.arch.families import FAMILIES

    patterns = [re.compile(p) for p in FAMILIES[family].fp8_keep]
    single = tiny_tensors(family, "ldm")
    save_file(single, tmp_path / "single.safetensors")
    _convert(capsys, tmp_path / "single.safetensors", tmp_path / "s8.safetensors", "--dtype", "fp8_e4m3fn")
    written = load_file(tmp_path / "s8.safetensors")
    kept = {name for name, t in single.items() if t.ndim == 2 and any(p.match(name) for p in patterns)}
    assert kept, "the tiny model has none of the family's kept modules"
    for name, tensor in single.items():
        if tensor.ndim == 2 and name.endswith(".weight"):
            assert (written[name].dtype == torch.float32) == (name in kept), name

    # the same model in diffusers names: the kept tensors are the same ones
    _convert(capsys, tmp_path / "single.safetensors", tmp_path / "d.safetensors", "--to", "diffusers")
    # (plain fp8: a scaled file's layout does not change, its scales would not survive the joins)
    _convert(capsys, tmp_path / "d.safetensors", tmp_path / "d8.safetensors", "--dtype", "fp8_e4m3fn",
             "--fp8-scaling", "plain")
    _convert(capsys, tmp_path / "d8.safetensors", tmp_path / "back.safetensors", "--to", "single-file")
    back = load_file(tmp_path / "back.safetensors")
    assert {n for n, t in back.items() if t.dtype == torch.float32 and t.ndim == 2} >= kept
    assert all(back[n].dtype == torch.float8_e4m3fn for n in single
               if single[n].ndim == 2 and n.endswith(".weight") and n not in kept and n in back)


def _mixed_file(path: Path, row_scales: bool, fmt: str = "float8_e4m3fn") -> dict[str, torch.Tensor]:
    """A tiny FLUX.1 in ComfyUI's mixed layout written here by hand: two layers in fp8 with a
    scale per tensor or per output row, listed in `_quantization_metadata`."""
    tensors = tiny_tensors("flux", "ldm")
    layers = ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear2"]
    for layer in layers:
        weight = tensors[layer + ".weight"]
        rows = weight.shape[0]
        scale = torch.linspace(0.01, 0.02, rows) if row_scales else torch.tensor(0.015)
        tensors[layer + ".weight"] = (weight / (scale.reshape(-1, 1) if row_scales else scale)).to(torch.float8_e4m3fn)
        tensors[layer + ".weight_scale"] = scale
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                      "layers": {layer: {"format": fmt} for layer in layers}})}
    save_file(tensors, path, metadata)
    return tensors


@pytest.mark.parametrize("row_scales", [False, True])
def test_mixed_precision_casts_to_its_scaled_values(tmp_path, capsys, row_scales):
    mixed = _mixed_file(tmp_path / "mixed.safetensors", row_scales)
    result = _convert(capsys, tmp_path / "mixed.safetensors", tmp_path / "plain.safetensors", "--dtype", "bf16")
    assert any("2 mixed-precision layers" in note for note in result["notes"])
    plain = load_file(tmp_path / "plain.safetensors")
    weight, scale = mixed["double_blocks.0.img_attn.qkv.weight"], mixed["double_blocks.0.img_attn.qkv.weight_scale"]
    expected = (weight.float() * (scale.reshape(-1, 1) if row_scales else scale)).to(torch.bfloat16)
    assert torch.equal(plain["double_blocks.0.img_attn.qkv.weight"], expected)
    assert not any(k.endswith(("weight_scale", "comfy_quant")) for k in plain)
    with safe_open(tmp_path / "plain.safetensors", "pt") as handle:
        assert "_quantization_metadata" not in handle.metadata()
    assert _ok_inspect(capsys, tmp_path / "plain.safetensors")["precision"]["label"] == "bf16"


def test_block_scaled_mixed_layers_are_refused(tmp_path, capsys):
    tensors = tiny_tensors("flux", "ldm")
    layer = "double_blocks.0.img_attn.qkv"
    rows, width = tensors[layer + ".weight"].shape
    tensors[layer + ".weight"] = tensors[layer + ".weight"].to(torch.float8_e4m3fn)
    tensors[layer + ".weight_scale"] = torch.ones(rows, width // 32, dtype=torch.uint8)
    metadata = {"_quantization_metadata": json.dumps({"layers": {layer: {"format": "mxfp8"}}})}
    save_file(tensors, tmp_path / "mx.safetensors", metadata)
    code, _out, err = run_sdkit(capsys, "convert", str(tmp_path / "mx.safetensors"), "--dtype", "bf16",
                                "-o", str(tmp_path / "plain.safetensors"))
    assert code == 1 and "block-scaled or packed" in err and not (tmp_path / "plain.safetensors").exists()


def test_gguf_changes_layout_with_a_cast(tmp_path, capsys):
    import gguf
    import numpy as np

    tensors = tiny_tensors("flux", "ldm")
    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", arch="flux")
    for name, value in tensors.items():
        array = value.numpy().astype(np.float32)
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            blocks = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, _out, err = run_sdkit(capsys, "convert", str(tmp_path / "tiny.gguf"), "--to", "diffusers",
                                "-o", str(tmp_path / "d.safetensors"))
    assert code == 1 and "add --dtype bf16" in err
    _convert(capsys, tmp_path / "tiny.gguf", tmp_path / "d.safetensors", "--to", "diffusers", "--dtype", "fp32")
    written = load_file(tmp_path / "d.safetensors")
    qkv = tensors["double_blocks.0.img_attn.qkv.weight"].numpy()
    dequantized = gguf.quants.dequantize(gguf.quants.quantize(qkv, gguf.GGMLQuantizationType.Q8_0),
                                         gguf.GGMLQuantizationType.Q8_0)
    rows = qkv.shape[0] // 3
    assert torch.equal(written["transformer_blocks.0.attn.to_k.weight"],
                       torch.from_numpy(np.ascontiguousarray(dequantized[rows:2 * rows])))


def _ok_inspect(capsys, path: Path) -> dict:
    code, out, err = run_sdkit(capsys, "inspect", "--json", str(path))
    assert code == 0, err
    return json.loads(out)


def test_inspect_reports_the_stored_type_of_each_layer_class(tmp_path, capsys, flux):
    source, _original = flux
    _convert(capsys, source, tmp_path / "scaled.safetensors", "--dtype", "fp8_e4m3fn")
    classes = _ok_inspect(capsys, tmp_path / "scaled.safetensors")["precision"]["quantization"]["layer_classes"]
    assert "double_blocks.N.img_attn.qkv" in classes["fp8 e4m3fn scaled"]
    assert "single_blocks.N.linear1" in classes["fp8 e4m3fn scaled"]
    assert {"img_in", "final_layer.linear", "final_layer.adaLN_modulation.1"} <= set(classes["fp32"])
