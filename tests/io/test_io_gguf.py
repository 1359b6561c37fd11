"""Reading GGUF files (ComfyUI-GGUF's quantized diffusion models): shapes, dtypes and
metadata from the header, tensors dequantized on load exactly as the `gguf` package
dequantizes them, and one-line refusals of broken files.

Files are written with `gguf.GGUFWriter`; types `gguf.quants` can quantize are made from
a float source, the K-quants and IQ4 types (which it can only dequantize) from random
blocks whose bytes all stay below 0x3C, so every float16 scale in them is finite.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from cli_run import run_sdkit
from gguf import GGMLQuantizationType as Q

from sdkit.errors import SdkitError
from sdkit.io import lazy_tensors, open_model
from sdkit.io.model_file import dtype_bits

# type -> largest error allowed, as a share of the source's largest magnitude
QUANTIZED_FROM_SOURCE = {
    Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1 / 128, Q.Q8_0: 1 / 100, Q.Q5_0: 1 / 24,
    Q.Q5_1: 1 / 24, Q.Q4_0: 1 / 12, Q.Q4_1: 1 / 12, Q.MXFP4: 1 / 4,
}
RANDOM_BLOCKS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS)
PLAIN_CODES = {Q.F32: "F32", Q.F16: "F16", Q.BF16: "BF16"}
ROWS, COLUMNS = 6, 512  # rows a multiple of every block size (32, 256)
RESHAPED = "img_in.weight"
RESHAPED_SHAPE = (32, 24, 3, 3)  # 6912 = 27 rows of 256, as convert.py would store it


def tensor_name(qtype: Q) -> str:
    return f"double_blocks.{int(qtype)}.img_attn.qkv.weight"


def code_of(qtype: Q) -> str:
    return PLAIN_CODES.get(qtype, f"GGUF_{qtype.name}")


def random_blocks(qtype: Q, rng: np.random.Generator) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 0x3C, size=(ROWS, COLUMNS // block_size * type_size), dtype=np.uint8)


def stored_tensors() -> dict[str, tuple[Q, np.ndarray, np.ndarray | None]]:
    """name -> (type, bytes or array as stored, float source or None)."""
    rng = np.random.default_rng(0)
    tensors: dict[str, tuple[Q, np.ndarray, np.ndarray | None]] = {}
    for qtype in QUANTIZED_FROM_SOURCE:
        source = rng.standard_normal((ROWS, COLUMNS)).astype(np.float32)
        tensors[tensor_name(qtype)] = (qtype, gguf.quants.quantize(source, qtype), source)
    for qtype in RANDOM_BLOCKS:
        tensors[tensor_name(qtype)] = (qtype, random_blocks(qtype, rng), None)
    reshaped = rng.standard_normal(RESHAPED_SHAPE).astype(np.float32)
    tensors[RESHAPED] = (Q.Q8_0, gguf.quants.quantize(reshaped.reshape(-1, 256), Q.Q8_0), reshaped)
    bias = rng.standard_normal(COLUMNS).astype(np.float32)
    tensors["double_blocks.0.img_attn.qkv.bias"] = (Q.F32, bias, bias)
    return tensors


def write_gguf(path: Path, tensors: dict[str, tuple[Q, np.ndarray, np.ndarray | None]],
               arch: str = "flux", extra: dict[str, object] | None = None) -> Path:
    """A GGUF file as ComfyUI-GGUF's convert.py writes one."""
    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, value in (extra or {}).items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        else:
            writer.add_float32(key, float(value))  # type: ignore[arg-type]
    for name, (qtype, stored, _source) in tensors.items():
        if name == RESHAPED:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(RESHAPED_SHAPE))
        writer.add_tensor(name, stored, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tensors() -> dict[str, tuple[Q, np.ndarray, np.ndarray | None]]:
    return stored_tensors()


@pytest.fixture(scope="module")
def flux_gguf(tmp_path_factory: pytest.TempPathFactory, tensors) -> Path:  # type: ignore[no-untyped-def]
    extra = {"general.name": "toy flux", "test.scale": 0.1, "test.flag": True,
             "test.long": list(range(100)), "test.words": ["a", "b"]}
    return write_gguf(tmp_path_factory.mktemp("gguf") / "flux-Q8_0.gguf", tensors, extra=extra)


def logical_shape(name: str, stored: np.ndarray, qtype: Q) -> tuple[int, ...]:
    if name == RESHAPED:
        return RESHAPED_SHAPE
    if stored.dtype != np.uint8:  # F32 and F16 are stored as arrays, the rest as bytes
        return tuple(stored.shape)
    return tuple(gguf.quants.quant_shape_from_byte_shape(stored.shape, qtype))


def test_infos_give_pytorch_shapes_and_a_code_per_type(flux_gguf: Path, tensors) -> None:  # type: ignore[no-untyped-def]
    with open_model(flux_gguf) as model:
        assert model.format == "gguf"
        assert list(model.keys()) == list(tensors)
        assert model.size_bytes == flux_gguf.stat().st_size
        for name, (qtype, stored, _source) in tensors.items():
            info = model.info(name)
            assert info.dtype == code_of(qtype), name
            assert info.shape == logical_shape(name, stored, qtype), name
            assert info.nbytes == stored.nbytes, name


def test_load_is_what_the_gguf_package_dequantizes(flux_gguf: Path, tensors) -> None:  # type: ignore[no-untyped-def]
    with open_model(flux_gguf) as model:
        for name, (qtype, stored, source) in tensors.items():
            loaded = model.load(name)
            shape = logical_shape(name, stored, qtype)
            expected = torch.from_numpy(gguf.quants.dequantize(stored, qtype).reshape(shape))
            if qtype in (Q.F16, Q.BF16):  # plain types load as stored
                assert loaded.dtype == {Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
                loaded = loaded.float()
            else:
                assert loaded.dtype == torch.float32, name
            assert loaded.shape == shape, name
            assert torch.equal(loaded, expected), name
            if source is not None:
                tolerance = QUANTIZED_FROM_SOURCE.get(qtype, 1 / 100) * float(np.abs(source).max())
                assert float((loaded - torch.from_numpy(source)).abs().max()) <= tolerance, name


def test_metadata_renders_every_key_as_text(flux_gguf: Path) -> None:
    with open_model(flux_gguf) as model:
        meta = model.metadata
    assert meta["general.architecture"] == "flux"
    assert meta["general.file_type"] == str(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    assert meta["general.quantization_version"] == str(gguf.GGML_QUANT_VERSION)
    assert meta["general.name"] == "toy flux"
    assert meta["test.scale"] == "0.1"
    assert meta["test.flag"] == "true"
    assert meta["test.words"] == '["a", "b"]'
    assert meta["test.long"] == "[100 INT32 values]"
    assert json.loads(meta[f"comfy.gguf.orig_shape.{RESHAPED}"]) == list(RESHAPED_SHAPE)


def test_bits_per_weight_follow_the_block_sizes() -> None:
    assert dtype_bits("GGUF_Q8_0") == 8.5  # 34 bytes per 32
    assert dtype_bits("GGUF_Q4_K") == 4.5  # 144 bytes per 256
    assert dtype_bits("BF16") == 16


def test_plain_tensors_have_spans_and_quantized_ones_load_as_float32(flux_gguf: Path, tensors) -> None:  # type: ignore[no-untyped-def]
    with open_model(flux_gguf) as model:
        bias = "double_blocks.0.img_attn.qkv.bias"
        span = model.span(bias)
        assert span is not None
        with open(flux_gguf, "rb") as file:
            file.seek(span.offset)
            assert file.read(span.length) == tensors[bias][1].tobytes()
        assert model.span(tensor_name(Q.Q8_0)) is None
        lazy = lazy_tensors(model)
        assert lazy[tensor_name(Q.Q8_0)].dtype == "F32"
        assert lazy[tensor_name(Q.BF16)].dtype == "BF16"
        assert lazy[tensor_name(Q.Q8_0)].load().dtype == torch.float32


def test_recognised_by_magic_bytes_and_header_read_without_torch(flux_gguf: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(flux_gguf.read_bytes())
    code = ("import sys; from sdkit.io import open_model; m = open_model(sys.argv[1]); "
            "print(m.format, len(m), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(renamed)], capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.split() == ["gguf", str(len(stored_tensors())), "False"]


def test_cli_inspect_json_reports_the_tensors(flux_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_sdkit(capsys, "inspect", "--json", str(flux_gguf))
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "gguf"
    assert report["tensors"] == len(stored_tensors())
    assert report["dtypes"]["GGUF_Q8_0"] == 2
    assert report["dtypes"]["GGUF_Q4_K"] == 1
    assert report["metadata"]["general.architecture"] == "flux"


# --- refusals ---------------------------------------------------------------------


def small_gguf(path: Path, orig_shape: list | None = None) -> bytes:
    """A one-tensor GGUF (Q8_0, 2x32), its bytes."""
    source = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    writer = gguf.GGUFWriter(path, arch="flux")
    if orig_shape is not None:
        writer.add_array("comfy.gguf.orig_shape.w", orig_shape)
    writer.add_tensor("w", gguf.quants.quantize(source, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def tensor_info_at(raw: bytes, name: bytes) -> int:
    """Offset of the n_dims field that follows a tensor's name in the tensor infos."""
    return raw.rindex(struct.pack("<Q", len(name)) + name) + 8 + len(name)


def patched(raw: bytes, offset: int, fmt: str, value: int) -> bytes:
    return raw[:offset] + struct.pack(fmt, value) + raw[offset + struct.calcsize(fmt):]


def broken_files(tmp_path: Path) -> dict[str, bytes]:
    raw = small_gguf(tmp_path / "good.gguf")
    info = tensor_info_at(raw, b"w")  # n_dims u32, dims u64 x2, type u32, offset u64
    with_array = small_gguf(tmp_path / "a.gguf", orig_shape=[2, 32])
    key = b"comfy.gguf.orig_shape.w"  # then value type u32, item type u32, count u64
    array_count = with_array.index(key) + len(key) + 8
    return {
        "empty": b"",
        "magic only": raw[:4],
        "wrong magic": b"GGML" + raw[4:],
        "truncated header": raw[:40],
        "truncated data": raw[:-40],  # the 68 data bytes are padded to 96
        "data offset past the end": patched(raw, info + 4 + 16 + 4, "<Q", 2**40),
        "huge dims": patched(patched(raw, info + 4, "<Q", 2**62), info + 12, "<Q", 2**62),
        "too many dims": patched(raw, info, "<I", 2**31),
        "unknown type": patched(raw, info + 4 + 16, "<I", 9999),
        "tensor count": patched(raw, 8, "<Q", 2**40),
        "key count": patched(raw, 16, "<Q", 2**40),
        "key length": patched(raw, raw.index(b"general.architecture") - 8, "<Q", 2**60),
        "array count": patched(with_array, array_count, "<Q", 2**60),
        "big-endian": raw[:4] + struct.pack(">I", 3) + raw[8:],
        "version 1": patched(raw, 4, "<I", 1),
        "orig shape of another count": small_gguf(tmp_path / "o.gguf", orig_shape=[3, 32]),
        "orig shape of strings": small_gguf(tmp_path / "s.gguf", orig_shape=["2", "32"]),
    }


def test_broken_files_are_refused_in_one_line(tmp_path: Path) -> None:
    for label, content in broken_files(tmp_path).items():
        path = tmp_path / f"{label.replace(' ', '-')}.gguf"
        path.write_bytes(content)
        with pytest.raises(SdkitError) as refused:
            open_model(path).close()
        message = str(refused.value)
        assert message.startswith(f"{path}: "), (label, message)
        assert "\n" not in message, (label, message)


def test_limits_are_named_in_the_refusal(tmp_path: Path) -> None:
    files = broken_files(tmp_path)
    expected = {"tensor count": "more than 50,000", "key count": "more than 50,000",
                "data offset past the end": "past the end", "truncated data": "past the end",
                "wrong magic": "GGUF magic", "huge dims": "over 2**63",
                "orig shape of strings": "not an ARRAY of INT32",
                "unknown type": "GGML type 9999"}
    for label, words in expected.items():
        path = tmp_path / "x.gguf"
        path.write_bytes(files[label])
        with pytest.raises(SdkitError, match="not a valid GGUF file: .*" + re.escape(words)):
            open_model(path)


def test_header_values_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GGUFReader keeps a few numpy views per header value: their number is capped."""
    import sdkit.io.gguf_reader

    monkeypatch.setattr(sdkit.io.gguf_reader, "MAX_HEADER_READS", 1000)
    path = tmp_path / "long.gguf"
    small_gguf(path, orig_shape=list(range(2000)))
    with pytest.raises(SdkitError, match="more than 1,000 values"):
        open_model(path)


@pytest.mark.parametrize("label", ["truncated data", "wrong magic", "array count"])
def test_cli_refuses_broken_gguf_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             label: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(broken_files(tmp_path)[label])
    code, _out, err = run_sdkit(capsys, "inspect", str(path))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdkit: error: "), err


def test_convert_writes_the_dequantized_tensors(flux_gguf: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    converted = tmp_path / "converted.safetensors"
    assert run_sdkit(capsys, "convert", str(flux_gguf), "-o", str(converted))[0] == 0
    written = load_file(converted)
    with open_model(flux_gguf) as model:
        for name in (tensor_name(Q.Q4_K), RESHAPED, tensor_name(Q.BF16)):
            assert torch.equal(written[name], model.load(name)), name


def test_merge_reads_a_quantized_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny FLUX.1-design transformer in ComfyUI-GGUF's layout: merged with itself at 0.5,
    every tensor comes out as its dequantized value."""
    import sys

    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))
    from released import tiny_tensors

    tensors = {}
    for name, tensor in tiny_tensors("flux", "ldm").items():
        source = tensor.numpy()
        quantized = source.ndim == 2 and source.shape[1] % 32 == 0
        tensors[name] = ((Q.Q8_0, gguf.quants.quantize(source, Q.Q8_0), source) if quantized
                         else (Q.F32, source, source))
    path = tmp_path / "tiny-flux-Q8_0.gguf"
    writer = gguf.GGUFWriter(path, arch="flux")
    for name, (qtype, stored, _source) in tensors.items():
        writer.add_tensor(name, stored, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    merged = tmp_path / "merged.safetensors"
    assert run_sdkit(capsys, "merge", str(path), str(path), "--alpha", "0.5", "-o", str(merged))[0] == 0
    written = load_file(merged)
    with open_model(path) as model:
        assert any(info.dtype == "GGUF_Q8_0" for info in model.infos.values())
        for name in model.keys():
            assert torch.equal(written[name], model.load(name)), name
