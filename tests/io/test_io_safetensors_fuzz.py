"""Random and mutated safetensors files: the parser either accepts a file the reference
library also accepts (same names, dtypes, shapes, metadata) or raises SdkitError —
nothing else escapes, and nothing hangs. `SDKIT_FUZZ_EXAMPLES` sets the budget."""

from __future__ import annotations

import json
import os
import struct
from datetime import timedelta
from pathlib import Path

import pytest
import safetensors
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdkit.errors import SdkitError
from sdkit.io import open_model
from sdkit.io.model_file import DTYPE_BITS

FUZZ = settings(max_examples=int(os.environ.get("SDKIT_FUZZ_EXAMPLES", "300")),
                deadline=timedelta(seconds=2), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = sorted(DTYPE_BITS) + ["F17", "f32", ""]
KEYS = ["a", "b", "__metadata__", "dtype", "shape", "data_offsets", "k"]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "case.safetensors"


def check(path: Path, content: bytes) -> None:
    """The property: SdkitError, or a model that agrees with the reference reader."""
    path.write_bytes(content)
    try:
        model = open_model(path)
    except SdkitError:
        return
    with model, safetensors.safe_open(str(path), "pt") as reference:
        assert sorted(model.keys()) == sorted(reference.keys())
        assert model.metadata == (reference.metadata() or {})
        for name in model.keys():
            try:
                tensor = model.load(name)
            except SdkitError:
                continue  # dtypes torch cannot hold are refused cleanly
            assert isinstance(tensor, torch.Tensor)
            assert tuple(tensor.shape) == model.info(name).shape
            expected = reference.get_tensor(name)
            assert torch.equal(tensor.reshape(-1).view(torch.uint8),
                               expected.reshape(-1).view(torch.uint8))


def frame(header: bytes, data: bytes, length_delta: int) -> bytes:
    return struct.pack("<Q", max(0, len(header) + length_delta)) + header + data


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2, max_value=2**65), st.floats(),
    st.sampled_from(DTYPES), st.text(max_size=4))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=20)

entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    "shape": st.lists(st.integers(min_value=0, max_value=4), max_size=3),
    "data_offsets": st.lists(st.integers(min_value=0, max_value=40), min_size=2, max_size=2),
})
headers = st.fixed_dictionaries(
    {}, optional={"__metadata__": st.one_of(
        st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), json_values),
        "a": st.one_of(entries, json_values), "b": entries, "c": entries})


@FUZZ
@given(content=st.binary(max_size=300))
def test_fuzz_safetensors_random_bytes(target: Path, content: bytes) -> None:
    check(target, content)


@FUZZ
@given(header=st.one_of(json_values, headers), data=st.binary(max_size=64),
       length_delta=st.sampled_from([0, 0, 0, -1, 1, 7]),
       padding=st.sampled_from([b"", b"   ", b"\n", b"\0"]))
def test_fuzz_safetensors_json_headers(target: Path, header, data: bytes, length_delta: int,
                                       padding: bytes) -> None:
    raw = json.dumps(header).encode("utf-8") + padding
    check(target, frame(raw, data, length_delta))


@st.composite
def valid_files(draw: st.DrawFn) -> bytes:
    """A well-formed file: consecutive offsets, exact sizes, random tensor bytes."""
    layout = draw(st.lists(st.tuples(st.sampled_from(sorted(DTYPE_BITS)),
                                     st.lists(st.integers(0, 3), max_size=3)), max_size=4))
    header: dict[str, object] = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3),
                                                      max_size=2))
    offset = 0
    for index, (dtype, shape) in enumerate(layout):
        count = 1
        for dim in shape:
            count *= dim
        nbytes = -(-count * DTYPE_BITS[dtype] // 8)
        header[f"t{index}"] = {"dtype": dtype, "shape": shape,
                               "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return frame(json.dumps(header).encode("utf-8"), draw(st.binary(min_size=offset,
                                                                    max_size=offset)), 0)


@FUZZ
@given(content=valid_files())
def test_fuzz_safetensors_well_formed_files(target: Path, content: bytes) -> None:
    check(target, content)


@FUZZ
@given(original=valid_files(), mutations=st.lists(
    st.tuples(st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255)),
    min_size=1, max_size=4))
def test_fuzz_safetensors_mutated_bytes(target: Path, original: bytes,
                                        mutations: list[tuple[int, int]]) -> None:
    content = bytearray(original)
    for position, value in mutations:
        content[position % len(content)] = value
    check(target, bytes(content))


WHOLE_BYTE_DTYPES = sorted(code for code, bits in DTYPE_BITS.items() if bits % 8 == 0)
SEPARATORS = [(",", ":"), (", ", ": "), (" ,\n", "\t: "), ("\r\n,", ":\n")]


@st.composite
def spelled_files(draw: st.DrawFn) -> bytes:
    """A well-formed file spelled as some writer might: any JSON whitespace, any field
    order, names needing escapes, scalar extra fields, big dimensions next to a zero."""
    header: dict[str, object] = {}
    offset = 0
    for name in draw(st.lists(st.text(max_size=6), max_size=4, unique=True)):
        if name == "__metadata__":
            continue
        dtype = draw(st.sampled_from(WHOLE_BYTE_DTYPES))
        shape = draw(st.one_of(st.lists(st.integers(0, 3), max_size=3),
                               st.just([0, 2**62]), st.just([2**63 - 1, 0])))
        count = 1
        for dim in shape:
            count *= dim
        nbytes = -(-count * DTYPE_BITS[dtype] // 8)
        fields = [("dtype", dtype), ("shape", shape), ("data_offsets", [offset, offset + nbytes])]
        if draw(st.booleans()):
            fields.append(("note", draw(st.one_of(st.none(), st.integers(), st.text(max_size=3)))))
        header[name] = dict(draw(st.permutations(fields)))
        offset += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3),
                                                      max_size=2))
    text = json.dumps(header, separators=draw(st.sampled_from(SEPARATORS)),
                      ensure_ascii=draw(st.booleans()))
    return frame(text.encode("utf-8"), draw(st.binary(min_size=offset, max_size=offset)), 0)


@FUZZ
@given(content=spelled_files())
def test_fuzz_safetensors_any_spelling(target: Path, content: bytes) -> None:
    check(target, content)
    model = open_model(target)  # well-formed: must be accepted whatever the spelling
    model.close()
