"""`sdkit lora bake` into quantized FLUX bases made by `sdkit convert` from one tiny model:
plain fp8 (e4m3fn, e5m2), ComfyUI scaled fp8, ComfyUI mixed fp8, GGUF Q8_0 and Q4_K.

The expected weights are computed here with torch, independently of sdkit: the base
dequantized as ComfyUI reads it (fp8 × its scale; GGUF blocks by `gguf.quants`) plus
`scale · up @ down` in float32. The output, dequantized the same way, must be within the
format's rounding of that:
- fp8 e4m3fn keeps 3 mantissa bits: a value is off by at most 2^-4 of itself, or half a
  subnormal step (2^-10 of the scale) below the normal range; e5m2 2^-3 and 2^-17;
- Q8_0: 32 values share d = max / 127 (stored in fp16), each off by at most d / 2 plus
  the rounding of d: 1/127 of the block's largest |value| bounds it;
- Q4_K: a relative RMS error of a few % over a tensor (the bound `test_convert_gguf` uses).
Tensors the LoRA does not touch must keep their exact bytes, and the files must hold what
ComfyUI reads: the same keys, dtypes and shapes, markers, `_quantization_metadata`, GGUF
fields and types.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli_run import exit_code, run_sdkit
from fixtures.families.released import TINY
from test_lora_support import single_thread  # noqa: F401  (autouse)
from transformer_loras import random_lora

Q = gguf.GGMLQuantizationType
RANK, SCALE = 4, 2.0  # random_lora stores alpha = 2 · rank
# the LoRA leaves these blocks alone: their weights, scales and blocks must keep their bytes
UNTOUCHED = ("single_blocks.", "final_layer.")
BASES = {"bf16": (".safetensors", ()), "fp8": (".safetensors", ("--dtype", "fp8_e4m3fn", "--fp8-scaling", "plain")),
         "fp8_e5m2": (".safetensors", ("--dtype", "fp8_e5m2", "--fp8-scaling", "plain")),
         "scaled": (".safetensors", ("--dtype", "fp8_e4m3fn", "--fp8-scaling", "scaled")),
         "mixed": (".safetensors", ("--dtype", "fp8_e4m3fn", "--fp8-scaling", "mixed")),
         "Q8_0": (".gguf", ("--to", "gguf", "--quant", "Q8_0")), "Q4_K": (".gguf", ("--to", "gguf", "--quant", "Q4_K"))}


def wide_flux() -> dict[str, torch.Tensor]:
    """A bf16 FLUX.1 of width 256 (rows that fill K-quant blocks), random weights."""
    _cls, config, single_file = TINY["flux"]
    config = dict(config, attention_head_dim=128, num_attention_heads=2, joint_attention_dim=256,
                  pooled_projection_dim=256, axes_dims_rope=(16, 56, 56))
    generator = torch.Generator().manual_seed(0)
    return {name: (torch.randn(shape, generator=generator) * 0.05).to(torch.bfloat16)
            for name, shape in single_file(config).items()}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """`wide_flux`, its quantized forms by `sdkit convert`, and a LoRA on every matrix
    outside `UNTOUCHED`."""
    folder = tmp_path_factory.mktemp("quantized")
    tensors = wide_flux()
    paths = {"bf16": folder / "bf16.safetensors"}
    save_file(tensors, paths["bf16"])
    for name, (suffix, args) in BASES.items():
        if args:
            paths[name] = folder / f"{name}{suffix}"
            assert exit_code(["convert", str(paths["bf16"]), "-o", str(paths[name]), *args]) == 0, name
    lora = {key: value for key, value in random_lora(tensors, "kohya", rank=RANK, seed=1).items()
            if not any(key.startswith("lora_unet_" + part.replace(".", "_")) for part in UNTOUCHED)}
    paths["lora"] = folder / "lora.safetensors"
    save_file(lora, paths["lora"])
    # one that takes a value past e4m3fn's 448: [0, 0] gets 2·100·4
    lora["lora_unet_double_blocks_0_img_mlp_0.lora_up.weight"][0] = 100.0
    lora["lora_unet_double_blocks_0_img_mlp_0.lora_down.weight"][:, 0] = 1.0
    paths["large_lora"] = folder / "large_lora.safetensors"
    save_file(lora, paths["large_lora"])
    return paths


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """Single-file weight name -> scale · up @ down of the kohya LoRA at `path`."""
    lora = load_file(path)
    out = {}
    for key in lora:
        if key.endswith(".lora_down.weight"):
            module = key[: -len(".lora_down.weight")]
            up, down = lora[module + ".lora_up.weight"].float(), lora[module + ".lora_down.weight"].float()
            out[_single_file_name(module)] = SCALE * up @ down
    return out


def _single_file_name(module: str) -> str:
    """`lora_unet_double_blocks_0_img_attn_qkv` -> `double_blocks.0.img_attn.qkv.weight`."""
    words = module[len("lora_unet_"):].split("_")
    joined = {"double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
              "time_in", "vector_in", "in_layer", "out_layer", "img_in", "txt_in", "final_layer", "guidance_in"}
    parts: list[str] = []
    for word in words:
        if parts and f"{parts[-1]}_{word}" in joined:
            parts[-1] = f"{parts[-1]}_{word}"
        else:
            parts.append(word)
    return ".".join(parts) + ".weight"


# ---- reading the files as ComfyUI does -------------------------------------------------------

def safetensors_values(path: Path) -> dict[str, torch.Tensor]:
    """Every weight as the float32 values it stands for (fp8 × `scale_weight` / `weight_scale`)."""
    tensors = load_file(path)
    out = {}
    for name, value in tensors.items():
        layer = name[: -len(".weight")] if name.endswith(".weight") else None
        scale = tensors.get(f"{layer}.scale_weight", tensors.get(f"{layer}.weight_scale")) if layer else None
        value = value.float()
        if scale is not None:
            value = value * (scale.float().reshape(()) if scale.numel() == 1 else scale.float().reshape(-1, 1))
        out[name] = value
    return out


def gguf_values(path: Path) -> dict[str, tuple[Q, torch.Tensor]]:
    reader = gguf.GGUFReader(path)
    out = {}
    for tensor in reader.tensors:
        shape = tuple(int(dim) for dim in reversed(tensor.shape))
        if tensor.tensor_type in (Q.F32, Q.F16):
            values = np.array(tensor.data, dtype=np.float32)
        else:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        out[tensor.name] = (tensor.tensor_type, torch.from_numpy(np.ascontiguousarray(values)).reshape(shape))
    return out


def values_of(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".gguf":
        return {name: value for name, (_kind, value) in gguf_values(path).items()}
    return safetensors_values(path)


def raw_bytes(path: Path) -> dict[str, bytes]:
    """Each tensor's stored bytes."""
    if path.suffix == ".gguf":
        return {t.name: np.ascontiguousarray(t.data).tobytes() for t in gguf.GGUFReader(path).tensors}
    return {name: value.reshape(-1).view(torch.uint8).numpy().tobytes() for name, value in load_file(path).items()}


# ---- bounds ------------------------------------------------------------------------------------

def within_fp8(result: torch.Tensor, expected: torch.Tensor, unit: float, subnormal: float, scale: torch.Tensor,
               largest: float) -> bool:
    """Each value within `unit` of itself, or `subnormal` of the scale; clamped at ±largest·scale."""
    scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)
    target = torch.maximum(torch.minimum(expected, largest * scale), -largest * scale)
    return bool(((result - target).abs() <= unit * target.abs() + subnormal * scale + 1e-7).all())


def within_q8_0(result: torch.Tensor, expected: torch.Tensor) -> bool:
    blocks = expected.reshape(-1, 32)
    bound = blocks.abs().amax(dim=1, keepdim=True) / 127
    return bool(((result.reshape(-1, 32) - blocks).abs() <= bound).all())


def relative_rms(result: torch.Tensor, expected: torch.Tensor) -> float:
    return float((result - expected).norm() / expected.norm())


def check_values(kind: str, out: Path, base: Path, lora: Path) -> None:
    before, after, added = values_of(base), values_of(out), deltas(lora)
    stored = load_file(out) if out.suffix != ".gguf" else {}
    types = {name: kind for name, (kind, _v) in gguf_values(out).items()} if out.suffix == ".gguf" else {}
    assert set(added) <= set(after)
    for name, delta in added.items():
        expected = before[name] + delta
        result = after[name]
        dtype = stored[name].dtype if stored else None
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            unit, subnormal = (2.0 ** -4, 2.0 ** -10) if dtype == torch.float8_e4m3fn else (2.0 ** -3, 2.0 ** -17)
            layer = name[: -len(".weight")]
            scale = stored.get(f"{layer}.scale_weight", stored.get(f"{layer}.weight_scale", torch.ones(())))
            assert within_fp8(result, expected, unit, subnormal, scale.float(), torch.finfo(dtype).max), name
        elif types.get(name) == Q.Q8_0:
            assert within_q8_0(result, expected), name
        elif types.get(name) == Q.Q4_K:
            assert relative_rms(result, expected) < 0.085, name
        else:  # bf16 (or F32 in a GGUF): rounded once
            assert float(((result - expected).abs() / expected.abs().clamp_min(1e-3)).max()) <= 2.0 ** -8, name


def bake(capsys, base: Path, lora: Path, out: Path, *extra: str) -> dict:
    code, text, err = run_sdkit(capsys, "lora", "bake", str(base), str(lora), "-o", str(out), "--json", *extra)
    assert code == 0, err
    return json.loads(text)


# ---- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(BASES))
def test_bake_into_each_base_matches_the_float_bake_within_its_format(kind, made, tmp_path, capsys):
    base = made[kind]
    out = tmp_path / f"out{base.suffix}"
    report = bake(capsys, base, made["lora"], out)
    check_values(kind, out, base, made["lora"])
    if kind != "bf16":
        requantized = report["requantized"]
        assert requantized["requantized"] > 0 and requantized["errors"]
        assert "double_blocks.N.img_attn.qkv" in requantized["errors"]
        assert not any(name.startswith(UNTOUCHED) for name in requantized["errors"])
    # the untouched tensors keep their bytes; the touched ones keep dtype / type and shape
    before, after = raw_bytes(base), raw_bytes(out)
    assert set(before) == set(after)
    changed = {name for name in before if before[name] != after[name]}
    assert changed and not any(name.startswith(UNTOUCHED) for name in changed)
    assert all(name.endswith((".weight", ".scale_weight", ".weight_scale")) for name in changed), changed
    code, text, err = run_sdkit(capsys, "inspect", "--json", str(out))
    assert code == 0, err
    assert json.loads(text)["precision"]["label"] == json.loads(run_sdkit(capsys, "inspect", "--json", str(base))[1])[
        "precision"]["label"]


@pytest.mark.parametrize("kind", ["scaled", "mixed"])
def test_each_touched_weight_is_baked_once(kind, made, tmp_path, capsys, monkeypatch):
    """A fresh scale is known once its weight is baked: the scales are laid out after the
    weights, so no weight is baked a second time to measure its scale first."""
    from collections import Counter

    from sdkit.ops.lora.compute import KeyBaker

    calls: Counter[str] = Counter()
    compute = KeyBaker.compute

    def counted(self, name):
        calls[name] += 1
        return compute(self, name)
    monkeypatch.setattr(KeyBaker, "compute", counted)
    out = tmp_path / "out.safetensors"
    bake(capsys, made[kind], made["lora"], out)
    assert calls and set(calls.values()) == {1}
    check_values(kind, out, made[kind], made["lora"])


@pytest.mark.parametrize("kind", ["fp8", "scaled", "mixed"])
def test_safetensors_bases_keep_what_comfyui_reads(kind, made, tmp_path, capsys):
    base, out = made[kind], tmp_path / "out.safetensors"
    bake(capsys, base, made["lora"], out)
    with safe_open(base, "pt") as before, safe_open(out, "pt") as after:
        assert set(before.keys()) == set(after.keys())
        for name in before.keys():
            old, new = before.get_slice(name), after.get_slice(name)
            assert (old.get_dtype(), old.get_shape()) == (new.get_dtype(), new.get_shape()), name
        meta_before, meta_after = before.metadata(), after.metadata()
    assert meta_before.get("_quantization_metadata") == meta_after.get("_quantization_metadata")
    written = load_file(out)
    if kind == "scaled":
        assert written["scaled_fp8"].dtype == torch.float8_e4m3fn
        # a fresh scale: the baked weight's largest |value| over 448
        qkv = safetensors_values(out)["double_blocks.0.img_attn.qkv.weight"]
        scale = written["double_blocks.0.img_attn.qkv.scale_weight"]
        assert scale.shape == () and float(scale) == pytest.approx(float(qkv.abs().max()) / 448, rel=1e-6)
    if kind == "mixed":
        layers = json.loads(meta_after["_quantization_metadata"])["layers"]
        assert all(json.loads(bytes(written[layer + ".comfy_quant"].tolist())) == {"format": "float8_e4m3fn"}
                   for layer in layers)
    assert not any(value.float().isnan().any() for value in written.values() if value.is_floating_point())


def test_plain_fp8_values_past_the_range_are_clamped(made, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    bake(capsys, made["fp8"], made["large_lora"], out)
    weight = load_file(out)["double_blocks.0.img_mlp.0.weight"].float()
    assert float(weight[0, 0]) == 448.0 and not weight.isnan().any()
    check_values("fp8", out, made["fp8"], made["large_lora"])  # within the clamped bound


def test_row_scaled_mixed_layers_get_fresh_row_scales(made, tmp_path, capsys):
    """A mixed layer whose `weight_scale` has one value per output row keeps that form."""
    tensors = load_file(made["mixed"])
    with safe_open(made["mixed"], "pt") as handle:
        metadata = handle.metadata()
    layer = "double_blocks.0.txt_attn.qkv"
    values = tensors[layer + ".weight"].float() * tensors[layer + ".weight_scale"].float()
    rows = values.abs().amax(dim=1, keepdim=True) / 448
    tensors[layer + ".weight"] = (values / rows).to(torch.float8_e4m3fn)
    tensors[layer + ".weight_scale"] = rows.reshape(-1)
    base = tmp_path / "rows.safetensors"
    save_file(tensors, base, metadata=metadata)
    out = tmp_path / "out.safetensors"
    bake(capsys, base, made["lora"], out)
    written = load_file(out)
    scales = written[layer + ".weight_scale"]
    baked = safetensors_values(out)[layer + ".weight"]
    assert scales.shape == (768,)
    assert torch.allclose(scales, baked.abs().amax(dim=1) / 448, rtol=1e-6)
    check_values("mixed", out, base, made["lora"])


def test_gguf_output_keeps_every_field_and_type(made, tmp_path, capsys):
    base, out = made["Q8_0"], tmp_path / "out.gguf"
    bake(capsys, base, made["lora"], out)
    before, after = gguf.GGUFReader(base), gguf.GGUFReader(out)
    recipe = ("sdkit.recipe", "modelspec.date", "modelspec.title")
    for key, field in before.fields.items():
        assert key in after.fields, key
        assert after.fields[key].types == field.types, key
        if key not in recipe and not key.startswith("GGUF."):
            assert after.fields[key].contents() == field.contents(), key
    assert json.loads(after.fields["sdkit.recipe"].contents())["operation"] == "lora-bake"
    for old, new in zip(before.tensors, after.tensors):
        assert (old.name, old.tensor_type, list(old.shape)) == (new.name, new.tensor_type, list(new.shape))


def test_orig_shape_reshaped_tensors_are_stored_back_alike(made, tmp_path, capsys):
    """A tensor ComfyUI-GGUF stored as rows of another shape (`comfy.gguf.orig_shape`)
    is baked in its own shape and stored back in the file's."""
    from sdkit.io.gguf_writer import GgufTensor, TypedField, write_gguf

    reader = gguf.GGUFReader(made["Q8_0"])
    name = "double_blocks.0.img_attn.proj.weight"  # (256, 256) stored as (2048, 32)
    tensors = []
    for tensor in reader.tensors:
        shape = tuple(int(dim) for dim in reversed(tensor.shape))
        if tensor.name == name:
            shape = (2048, 32)
        tensors.append(GgufTensor(tensor.name, shape, tensor.tensor_type, lambda data=tensor.data: data))
    fields = {"general.file_type": TypedField(7, gguf.GGUFValueType.UINT32),
              "comfy.gguf.orig_shape." + name: [256, 256]}
    base = tmp_path / "reshaped.gguf"
    write_gguf(base, "flux", fields, tensors)
    out = tmp_path / "out.gguf"
    bake(capsys, base, made["lora"], out)
    written = gguf.GGUFReader(out)
    stored = next(t for t in written.tensors if t.name == name)
    assert list(reversed(stored.shape.tolist())) == [2048, 32] and stored.tensor_type == Q.Q8_0
    field = written.get_field("comfy.gguf.orig_shape." + name)
    assert field.contents() == [256, 256] and field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    expected = values_of(made["Q8_0"])[name] + deltas(made["lora"])[name]
    result = torch.from_numpy(gguf.quants.dequantize(stored.data, Q.Q8_0)).reshape(256, 256)
    assert within_q8_0(result, expected)


def _nvfp4_layer(tensors: dict, layer: str) -> None:
    rows, columns = tensors[layer + ".weight"].shape
    tensors[layer + ".weight"] = torch.zeros(rows, columns // 2, dtype=torch.uint8)
    tensors[layer + ".weight_scale"] = torch.ones(rows, columns // 16).to(torch.float8_e4m3fn)
    tensors[layer + ".weight_scale_2"] = torch.tensor(1.0)
    tensors[layer + ".comfy_quant"] = torch.tensor(list(b'{"format":"nvfp4"}'), dtype=torch.uint8)


def _mxfp8_layer(tensors: dict, layer: str) -> None:
    rows, columns = tensors[layer + ".weight"].shape
    tensors[layer + ".weight_scale"] = torch.full((rows, columns // 32), 127, dtype=torch.uint8)
    tensors[layer + ".comfy_quant"] = torch.tensor(list(b'{"format":"mxfp8"}'), dtype=torch.uint8)


@pytest.mark.parametrize("fmt, make", [("nvfp4", _nvfp4_layer), ("mxfp8", _mxfp8_layer)])
def test_formats_sdkit_cannot_requantize_are_refused_in_one_line(fmt, make, made, tmp_path, capsys):
    tensors = load_file(made["mixed"])
    with safe_open(made["mixed"], "pt") as handle:
        metadata = dict(handle.metadata())
    layer = "double_blocks.0.img_attn.proj"
    make(tensors, layer)
    listed = json.loads(metadata["_quantization_metadata"])
    listed["layers"][layer] = {"format": fmt}
    metadata["_quantization_metadata"] = json.dumps(listed)
    base = tmp_path / f"{fmt}.safetensors"
    save_file(tensors, base, metadata=metadata)
    out = tmp_path / "out.safetensors"
    code, _out, err = run_sdkit(capsys, "lora", "bake", str(base), str(made["lora"]), "-o", str(out))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("sdkit: error: "), err
    assert f"is {fmt}" in lines[0] and "requantizes" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == [base]


@pytest.mark.parametrize("extra, output, message", [
    (("--dtype", "bf16"), "out.safetensors", "--dtype applies to bf16 / fp16 / fp32 bases"),
    ((), "out.gguf", "the bake keeps the base's format"),
])
def test_options_a_quantized_bake_cannot_honour_are_refused(extra, output, message, made, tmp_path, capsys):
    out = tmp_path / output
    code, _out, err = run_sdkit(capsys, "lora", "bake", str(made["scaled"]), str(made["lora"]), "-o", str(out),
                                *extra)
    assert code == 1 and err.startswith("sdkit: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_gguf_base_needs_a_gguf_output(made, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    code, _out, err = run_sdkit(capsys, "lora", "bake", str(made["Q4_K"]), str(made["lora"]), "-o", str(out))
    assert code == 1 and "give a .gguf output path" in err and err.count("\n") == 1
    assert not out.exists()


def test_a_changed_gguf_tensor_in_a_type_sdkit_does_not_write_is_refused(made, tmp_path, capsys):
    from sdkit.io.gguf_writer import GgufTensor, write_gguf

    name = "double_blocks.0.img_attn.proj.weight"
    tensors = []
    for tensor in gguf.GGUFReader(made["Q8_0"]).tensors:
        shape = tuple(int(dim) for dim in reversed(tensor.shape))
        if tensor.name == name:  # a type llama.cpp uses for activations, never written by sdkit
            blocks = 256 * 256 // 32 * gguf.GGML_QUANT_SIZES[Q.Q8_1][1]
            tensors.append(GgufTensor(name, shape, Q.Q8_1, lambda: np.zeros(blocks, dtype=np.uint8)))
        else:
            tensors.append(GgufTensor(tensor.name, shape, tensor.tensor_type, lambda data=tensor.data: data))
    base = tmp_path / "q8_1.gguf"
    write_gguf(base, "flux", {}, tensors)
    out = tmp_path / "out.gguf"
    code, _out, err = run_sdkit(capsys, "lora", "bake", str(base), str(made["lora"]), "-o", str(out))
    assert code == 1 and err.startswith("sdkit: error: ") and err.count("\n") == 1, err
    assert "Q8_1, which sdkit does not write" in err and not out.exists()


def test_a_baked_f16_gguf_tensor_past_float16_is_refused_with_advice_for_a_bake(made, tmp_path, capsys):
    base, out = tmp_path / "f16.gguf", tmp_path / "out.gguf"
    assert exit_code(["convert", str(made["bf16"]), "-o", str(base), "--to", "gguf", "--quant", "F16"]) == 0
    capsys.readouterr()
    lora = load_file(made["lora"])
    lora["lora_unet_double_blocks_0_img_mlp_0.lora_up.weight"][0] = 1000.0
    lora["lora_unet_double_blocks_0_img_mlp_0.lora_down.weight"][:, 0] = 100.0
    save_file(lora, tmp_path / "huge.safetensors")
    code, _out, err = run_sdkit(capsys, "lora", "bake", str(base), str(tmp_path / "huge.safetensors"), "-o", str(out))
    assert code == 1 and err.startswith("sdkit: error: ") and err.count("\n") == 1, err
    assert "double_blocks.0.img_mlp.0.weight: values beyond float16's range" in err
    assert "lower strength" in err and "--quant BF16" in err and not out.exists()
