"""Reading safetensors: header-only inspection, lazy loading, and refusal of every
malformed layout, checked against the reference `safetensors` library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from sdkit.errors import SdkitError
from sdkit.io import open_model
from sdkit.io.dtypes import CODE_TO_TORCH


def reference_rejects(path: Path) -> bool:
    try:
        with safetensors.safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                handle.get_slice(name)
    except Exception:
        return True
    return False


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t.{code}": torch.randint(0, 100, (3, 2), generator=generator, dtype=torch.int64)
               .to(dtype) for code, dtype in CODE_TO_TORCH.items()
               if not dtype.is_floating_point and not dtype.is_complex}
    for code, dtype in CODE_TO_TORCH.items():
        if dtype.is_floating_point:
            tensors[f"t.{code}"] = torch.randn(2, 3, generator=generator).to(dtype)
    tensors["complex"] = torch.randn(4, dtype=torch.complex64, generator=generator)
    tensors["scalar"] = torch.tensor(3.25, dtype=torch.float64)
    tensors["empty"] = torch.zeros(0, 5, dtype=torch.float16)
    return tensors


def test_every_dtype_matches_reference_loader(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "all.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt", "note": "é"})
    expected = safetensors.torch.load_file(path)
    with open_model(path) as model:
        assert model.format == "safetensors"
        assert model.metadata == {"format": "pt", "note": "é"}
        assert set(model.keys()) == set(expected)
        assert model.size_bytes == path.stat().st_size
        for name, tensor in expected.items():
            assert model.info(name).shape == tuple(tensor.shape)
            loaded = model.load(name)
            assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape
            assert torch.equal(as_bytes(loaded), as_bytes(tensor)), name


def test_infos_follow_header_order_and_sft_suffix(tmp_path: Path, raw_safetensors) -> None:
    header = {"z": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]},
              "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    path = tmp_path / "model.SFT"
    path.write_bytes(raw_safetensors(header, b"\x07\x09"))
    with open_model(path) as model:
        assert model.keys() == ["z", "a"]
        assert model.load("a").tolist() == [7] and model.load("z").tolist() == [9]
        assert model.metadata == {}


def test_loaded_tensors_are_private_copies_on_write(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"w": torch.ones(4)}, path)
    before = path.read_bytes()
    with open_model(path) as model:
        first = model.load("w")
        first.mul_(5)
        assert model.load("w").tolist() == [1.0] * 4
    assert first.tolist() == [5.0] * 4  # still valid after close
    assert path.read_bytes() == before


def test_load_after_close_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, path)
    model = open_model(path)
    model.close()
    with pytest.raises(SdkitError, match="closed"):
        model.load("w")


def test_sub_byte_dtypes_are_described_but_not_loaded(tmp_path: Path, raw_safetensors) -> None:
    header = {"f4": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]},
              "f6": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [2, 5]}}
    path = tmp_path / "mx.safetensors"
    path.write_bytes(raw_safetensors(header, b"\x00" * 5))
    with open_model(path) as model:
        assert model.info("f4").nbytes == 2 and model.info("f6").shape == (4,)
        with pytest.raises(SdkitError, match="F4 tensors is not supported"):
            model.load("f4")


def test_inspection_reads_the_header_without_torch(tmp_path: Path, raw_safetensors) -> None:
    # a sparse 6 GB file: only the header is ever read
    size = 3 * 1024**3
    header = {"big": {"dtype": "F16", "shape": [size], "data_offsets": [0, 2 * size]}}
    path = tmp_path / "huge.safetensors"
    path.write_bytes(raw_safetensors(header))
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size + 2 * size)
    script = ("import sys; from sdkit.io import open_model; m = open_model(sys.argv[1]); "
              "print(m.info('big').shape[0], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(size), "False"]


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

# (case id, header (dict or raw bytes), data, header_size override, message fragment)
MALFORMED = [
    ("header-length-past-eof", {"a": F32x2}, b"\0" * 8, 10_000, "runs past the end"),
    ("header-length-over-cap", b"{}", b"", 100_000_001, "exceeds the 100000000-byte limit"),
    ("truncated-data", {"a": F32x2}, b"\0" * 5, None, "truncated"),
    ("trailing-bytes", {"a": F32x2}, b"\0" * 9, None, "1 unexpected bytes"),
    ("non-json", b"{not json at all}", b"", None, "not valid JSON"),
    ("not-utf8", b'{"\xff": 1}', b"", None, "not UTF-8"),
    ("json-array", b"[]", b"", None, "does not start with '{'"),
    ("trailing-nul-padding", b"{}\0", b"", None, "not valid JSON"),
    ("metadata-int-value", {"__metadata__": {"k": 1}}, b"", None, "__metadata__['k'] is a number"),
    ("metadata-list", {"__metadata__": ["k"]}, b"", None, "__metadata__ is an array"),
    ("unknown-dtype", {"a": {**F32x2, "dtype": "F17"}}, b"\0" * 8, None, "unknown dtype 'F17'"),
    ("lowercase-dtype", {"a": {**F32x2, "dtype": "f32"}}, b"\0" * 8, None, "unknown dtype"),
    ("missing-offsets", {"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "data_offsets is missing"),
    ("three-offsets", {"a": {**F32x2, "data_offsets": [0, 8, 8]}}, b"\0" * 8, None, "has 3 items"),
    ("negative-dim", {"a": {**F32x2, "shape": [-2]}}, b"\0" * 8, None, "not a non-negative integer"),
    ("float-dim", {"a": {**F32x2, "shape": [2.0]}}, b"\0" * 8, None, "not a non-negative integer"),
    ("bool-dim", {"a": {**F32x2, "shape": [True, 2]}}, b"\0" * 8, None, "not a non-negative integer"),
    ("entry-not-object", {"a": [1, 2]}, b"", None, "entry is an array"),
    ("gap", {"a": {**F32x2, "data_offsets": [4, 12]}}, b"\0" * 12, None, "gap"),
    ("overlap", {"a": F32x2, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
     b"\0" * 8, None, "overlapping"),
    ("end-before-begin", {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                          "b": {"dtype": "U8", "shape": [0], "data_offsets": [1, 0]}},
     b"\0", None, "before it begins"),
    ("wrong-byte-size", {"a": {**F32x2, "shape": [3]}}, b"\0" * 8, None, "needs 12"),
    ("offset-out-of-range", {"a": {**F32x2, "data_offsets": [0, 4096]}}, b"\0" * 8, None, "needs 8"),
    ("odd-f4-count", {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0\0", None,
     "do not fill whole bytes"),
    ("huge-shape", {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 0]}},
     b"", None, "too large"),
    ("nan-constant", b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}',
     b"\0" * 8, None, "not valid JSON"),
    ("lone-surrogate", b'{"\\ud800": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}',
     b"", None, "invalid unicode escape"),
]

# cases where the reference library is more lenient than our documented rules
STRICTER_THAN_REFERENCE = [
    ("leading-space", b' {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0",
     "does not start with '{'"),
    ("duplicate-tensor", b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
                         b' "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0",
     "repeats the key 'a'"),
    ("duplicate-metadata", b'{"__metadata__": {"k": "1", "k": "2"}}', b"", "repeats the key 'k'"),
    ("duplicate-field", b'{"a": {"dtype": "U8", "dtype": "U8", "shape": [1], '
                        b'"data_offsets": [0, 1]}}', b"\0", "repeats the key 'dtype'"),
]


@pytest.mark.parametrize("case,header,data,header_size,message", MALFORMED,
                         ids=[case[0] for case in MALFORMED])
def test_malformed_headers_are_refused_like_the_reference(
        write_file, raw_safetensors, case, header, data, header_size, message) -> None:
    path = write_file(f"{case}.safetensors", raw_safetensors(header, data, header_size))
    assert reference_rejects(path)
    with pytest.raises(SdkitError, match="not a valid safetensors file") as error:
        open_model(path)
    assert message in str(error.value)
    assert str(error.value).startswith(str(path))


@pytest.mark.parametrize("case,header,data,message", STRICTER_THAN_REFERENCE,
                         ids=[case[0] for case in STRICTER_THAN_REFERENCE])
def test_our_rules_are_stricter_where_documented(write_file, raw_safetensors, case, header,
                                                 data, message) -> None:
    path = write_file(f"{case}.safetensors", raw_safetensors(header, data))
    with pytest.raises(SdkitError, match=message):
        open_model(path)


@pytest.mark.parametrize("content,message", [
    (b"", "the file is empty"),
    (b"\x05\x00\x00", "fewer than the 8-byte header length"),
])
def test_empty_and_tiny_files(write_file, content: bytes, message: str) -> None:
    path = write_file("tiny.safetensors", content)
    with pytest.raises(SdkitError, match=message):
        open_model(path)


@pytest.mark.parametrize("zip_format,hint", [(True, "PyTorch zip checkpoint"), (False, "pickle")])
def test_renamed_checkpoint_gets_a_hint(tmp_path: Path, zip_format: bool, hint: str) -> None:
    path = tmp_path / "renamed.safetensors"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(SdkitError, match="not a valid safetensors file") as error:
        open_model(path)
    assert hint in str(error.value)


def test_whitespace_padding_and_empty_model_are_valid(write_file, raw_safetensors) -> None:
    header = json.dumps({"__metadata__": {"k": "v"}}).encode() + b"  \n\t "
    path = write_file("padded.safetensors", raw_safetensors(header))
    assert not reference_rejects(path)
    with open_model(path) as model:
        assert len(model) == 0 and model.metadata == {"k": "v"}
