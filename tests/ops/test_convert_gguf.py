"""`sdkit convert MODEL --to gguf --quant TYPE`, checked as ComfyUI-GGUF's loader reads files.

ComfyUI-GGUF is not a package, so its loader's needs are stated here as facts, from
city96/ComfyUI-GGUF `loader.py` (`gguf_sd_loader`, `get_orig_shape`):
- it opens the file with `gguf.GGUFReader` and takes each tensor's name as the state-dict
  key (stripping `model.diffusion_model.` only if present);
- `general.architecture` must be a STRING in IMG_ARCH_LIST (below);
- a tensor's shape is `comfy.gguf.orig_shape.<name>` when that key exists, which must be an
  ARRAY of INT32; otherwise its GGUF dims reversed;
- F32 and F16 tensors are viewed as that shape directly (their element count must match);
  other types are dequantized later by `dequant.py`, as `gguf.quants.dequantize` does.
And from `tools/convert.py`: `general.quantization_version` is GGML_QUANT_VERSION and
`general.file_type` a LlamaFileType.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))

from cli_run import run_sdkit  # noqa: E402
from released import TINY, tiny_tensors  # noqa: E402

IMG_ARCH_LIST = {"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan", "lumina2",
                 "qwen_image"}
ORIG_SHAPE = "comfy.gguf.orig_shape."
TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy"
# relative RMS error of a Gaussian tensor in each type (format bounds, as in test_gguf_kquants)
RELATIVE_BOUND = {"F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q6_K": 0.025, "Q5_K": 0.045, "Q5_1": 0.05,
                  "Q5_0": 0.05, "Q4_K": 0.085, "Q4_1": 0.1, "Q4_0": 0.11, "Q3_K": 0.17, "Q2_K": 0.33}


def loader_view(path: Path) -> tuple[str, dict[str, tuple[gguf.GGMLQuantizationType, tuple[int, ...], np.ndarray]]]:
    """(architecture, name -> (type, shape, float32 values)) as gguf_sd_loader builds them."""
    reader = gguf.GGUFReader(path)
    field = reader.get_field("general.architecture")
    assert field.types == [gguf.GGUFValueType.STRING]
    arch = str(field.parts[field.data[-1]], encoding="utf-8")
    tensors = {}
    for tensor in reader.tensors:
        orig = reader.get_field(ORIG_SHAPE + tensor.name)
        if orig is not None:
            assert orig.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
            shape = tuple(int(orig.parts[index][0]) for index in orig.data)
        else:
            shape = tuple(int(dim) for dim in reversed(tensor.shape))
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            values = torch.from_numpy(np.array(tensor.data)).view(*shape).float().numpy()
        else:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        tensors[tensor.name] = (tensor.tensor_type, shape, values)
    return arch, tensors


def field_int(path: Path, key: str) -> int:
    field = gguf.GGUFReader(path).get_field(key)
    return int(field.parts[field.data[-1]][0])


def convert(capsys, source: Path, output: Path, *extra: str) -> dict:
    code, out, err = run_sdkit(capsys, "convert", str(source), "-o", str(output), "--to", "gguf", "--json", *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def flux_256(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A bf16 FLUX.1 of width 256 (rows that fill K-quant blocks), in BFL names."""
    _cls, config, single_file = TINY["flux"]
    config = dict(config, attention_head_dim=128, num_attention_heads=2, joint_attention_dim=256,
                  pooled_projection_dim=256, axes_dims_rope=(16, 56, 56))
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator).to(torch.bfloat16)
               for name, shape in single_file(config).items()}
    path = tmp_path_factory.mktemp("flux") / "flux.safetensors"
    save_file(tensors, path)
    return path, tensors


def check_against_source(path: Path, source: dict[str, torch.Tensor], quant: str) -> dict:
    arch, tensors = loader_view(path)
    assert arch in IMG_ARCH_LIST
    assert field_int(path, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert set(tensors) == set(source)
    for name, (kind, shape, values) in tensors.items():
        original = source[name].float().numpy()
        assert shape == tuple(original.shape), name
        if kind == gguf.GGMLQuantizationType[quant]:
            error = np.sqrt(((values - original) ** 2).sum() / (original ** 2).sum())
            assert error < RELATIVE_BOUND[quant], (name, error)
        elif kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.BF16):
            assert np.array_equal(values, original), name  # bf16 source: exact
    return tensors


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K", "Q5_0", "Q6_K", "Q2_K"])
def test_flux_as_comfyui_gguf_loads_it(tmp_path, capsys, flux_256, quant):
    source, tensors = flux_256
    result = convert(capsys, source, tmp_path / "out.gguf", "--quant", quant)
    written = check_against_source(tmp_path / "out.gguf", tensors, quant)
    kinds = {name: kind.name for name, (kind, _shape, _values) in written.items()}
    assert arch_of(tmp_path / "out.gguf") == "flux"
    assert field_int(tmp_path / "out.gguf", "general.file_type") == int({
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S,
        "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
        "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K}[quant])
    assert kinds["double_blocks.0.img_attn.qkv.weight"] == quant
    assert kinds["single_blocks.0.linear1.weight"] == quant
    # lcpp.patch leaves FLUX's embedders and final layer unquantized; convert.py keeps
    # 1-D and small (<= 1024 values) tensors of a bf16 source in F32
    assert kinds["txt_in.weight"] == "BF16" and kinds["final_layer.adaLN_modulation.1.weight"] == "BF16"
    assert kinds["double_blocks.0.img_attn.qkv.bias"] == "F32" and kinds["img_in.weight"] == "F32"
    report = result["gguf"]
    assert report["quant"] == quant and report["quantized"] == sum(kind == quant for kind in kinds.values())
    assert all(error["relative"] < RELATIVE_BOUND[quant] for error in report["errors"].values())


def arch_of(path: Path) -> str:
    return loader_view(path)[0]


def test_keep_pattern_and_inspect_and_back(tmp_path, capsys, flux_256):
    source, tensors = flux_256
    out = tmp_path / "out.gguf"
    result = convert(capsys, source, out, "--quant", "q4_k", "--keep", "single_blocks.*")
    _arch, written = loader_view(out)
    assert written["single_blocks.0.linear1.weight"][0].name == "BF16"
    assert "single_blocks.0.linear1.weight" in result["gguf"]["kept"]["--keep"]
    code, text, err = run_sdkit(capsys, "inspect", "--json", str(out))
    assert code == 0, err
    inspected = json.loads(text)
    assert inspected["family"] == "flux" and inspected["precision"]["label"] == "GGUF Q4_K"
    assert 4.5 < inspected["precision"]["quantization"]["bits_per_weight"] < 16
    code, _text, err = run_sdkit(capsys, "convert", str(out), "--dtype", "bf16", "-o", str(tmp_path / "back.safetensors"))
    assert code == 0, err
    back = load_file(tmp_path / "back.safetensors")
    for name, (_kind, _shape, values) in written.items():
        assert torch.equal(back[name], torch.from_numpy(values).to(torch.bfloat16)), name


def test_diffusers_names_become_single_file_names(tmp_path, capsys):
    diffusers = {name: tensor.contiguous() for name, tensor in tiny_tensors("flux", "diffusers").items()}
    save_file(diffusers, tmp_path / "diffusers.safetensors")
    save_file(tiny_tensors("flux", "ldm"), tmp_path / "bfl.safetensors")
    convert(capsys, tmp_path / "diffusers.safetensors", tmp_path / "a.gguf", "--quant", "Q8_0")
    convert(capsys, tmp_path / "bfl.safetensors", tmp_path / "b.gguf", "--quant", "Q8_0")
    _a, from_diffusers = loader_view(tmp_path / "a.gguf")
    _b, from_bfl = loader_view(tmp_path / "b.gguf")
    assert {n: s for n, (_k, s, _v) in from_diffusers.items()} == {n: s for n, (_k, s, _v) in from_bfl.items()}


def test_sd1_unet_reshaped_rows_with_orig_shape(tmp_path, capsys):
    out = tmp_path / "sd1.gguf"
    result = convert(capsys, TOY / "sd1" / "toy-sd1.safetensors", out, "--quant", "Q8_0")
    reader = gguf.GGUFReader(out)
    arch, written = loader_view(out)
    assert arch == "sd1" and not any(name.startswith("model.diffusion_model.") for name in written)
    source = {name[len("model.diffusion_model."):]: tensor for name, tensor in
              load_file(TOY / "sd1" / "toy-sd1.safetensors").items() if name.startswith("model.diffusion_model.")}
    assert set(written) == set(source)
    reshaped = result["gguf"]["reshaped"]
    assert reshaped
    for name in reshaped:  # convert.py's shape_fix: stored as rows of 256, shape in the header
        stored = next(t for t in reader.tensors if t.name == name)
        assert tuple(int(d) for d in stored.shape) == (256, source[name].numel() // 256)
        assert written[name][1] == tuple(source[name].shape)
    for name, (_kind, shape, values) in written.items():
        assert shape == tuple(source[name].shape)
        assert np.abs(values - source[name].float().numpy()).max() <= np.abs(source[name].float().numpy()).max() / 50


def test_wan_five_dim_patch_embedding_stays_f32(tmp_path, capsys):
    tensors = {name: tensor.to(torch.bfloat16) for name, tensor in tiny_tensors("wan", "ldm").items()}
    save_file(tensors, tmp_path / "wan.safetensors")
    convert(capsys, tmp_path / "wan.safetensors", tmp_path / "wan.gguf", "--quant", "Q8_0")
    arch, written = loader_view(tmp_path / "wan.gguf")
    assert arch == "wan"
    kind, shape, values = written["patch_embedding.weight"]
    assert len(shape) == 5 and kind.name == "F32" and shape == tuple(tensors["patch_embedding.weight"].shape)
    assert np.array_equal(values, tensors["patch_embedding.weight"].float().numpy())
    assert written["blocks.0.modulation"][0].name == "F32"  # convert.py keys_hiprec for wan


@pytest.mark.parametrize("args, message", [
    (("--quant", "Q9_9"), "--quant must be one of"),
    ((), "--to gguf needs --quant"),
])
def test_bad_quant_is_one_line(tmp_path, capsys, flux_256, args, message):
    code, _out, err = run_sdkit(capsys, "convert", str(flux_256[0]), "-o", str(tmp_path / "o.gguf"), "--to", "gguf",
                                *args)
    assert code == 1 and err.startswith("sdkit: error:") and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_vae_and_unsupported_family_refused(tmp_path, capsys):
    code, _out, err = run_sdkit(capsys, "convert", str(TOY / "sd1" / "toy-sd1.vae.safetensors"), "-o",
                                str(tmp_path / "o.gguf"), "--to", "gguf", "--quant", "Q8_0")
    assert code == 1 and "VAE" in err and "writes diffusion models" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_no_output(tmp_path, capsys, flux_256):
    tensors = dict(flux_256[1])
    tensors["single_blocks.0.linear2.weight"] = tensors["single_blocks.0.linear2.weight"].clone()
    tensors["single_blocks.0.linear2.weight"][0, 0] = float("inf")
    save_file(tensors, tmp_path / "inf.safetensors")
    out = tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    code, _out, err = run_sdkit(capsys, "convert", str(tmp_path / "inf.safetensors"), "-o", str(out), "--to", "gguf",
                                "--quant", "Q8_0")
    assert code == 1 and "inf or nan" in err
    assert list(out.parent.iterdir()) == []  # no partial file left
