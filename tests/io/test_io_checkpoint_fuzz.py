"""Random and mutated pickle checkpoints: the restricted unpickler either returns a model
whose tensors load with their declared shapes, or raises SdkitError — nothing else
escapes, and nothing hangs. `SDKIT_FUZZ_EXAMPLES` sets the budget."""

from __future__ import annotations

import io
import os
import zipfile
from collections import OrderedDict
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdkit.errors import SdkitError
from sdkit.io import open_model

FUZZ = settings(max_examples=int(os.environ.get("SDKIT_FUZZ_EXAMPLES", "300")),
                deadline=timedelta(seconds=2), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _saved(zip_format: bool) -> bytes:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    obj = {"state_dict": OrderedDict(w=base, t=base.t(), h=base.half(), i=torch.arange(3)),
           "global_step": 7, "names": ["a", "b"], "hn": {768: (base[0], base[1])}}
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


LEGACY = _saved(zip_format=False)
ZIPPED = _saved(zip_format=True)
with zipfile.ZipFile(io.BytesIO(ZIPPED)) as _archive:
    RECORDS = {info.filename: _archive.read(info) for info in _archive.infolist()}
PICKLE_NAME = next(name for name in RECORDS if name.endswith("/data.pkl"))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "case.ckpt"


def check(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    try:
        model = open_model(path)
    except SdkitError:
        return
    with model:
        for name in model.keys():
            try:
                tensor = model.load(name)
            except SdkitError:
                continue
            assert tuple(tensor.shape) == model.info(name).shape
            tensor.sum()  # touches every element: the view lies inside the mapping


def mutate(original: bytes, mutations: list[tuple[int, int]]) -> bytes:
    content = bytearray(original)
    for position, value in mutations:
        content[position % len(content)] = value
    return bytes(content)


mutation_lists = st.lists(st.tuples(st.integers(min_value=0, max_value=2**20),
                                    st.integers(min_value=0, max_value=255)),
                          min_size=1, max_size=6)


@FUZZ
@given(prefix=st.sampled_from([b"", b"\x80\x02", b"\x80\x04", b"PK\x03\x04"]),
       content=st.binary(max_size=300))
def test_fuzz_unpickler_random_bytes(target: Path, prefix: bytes, content: bytes) -> None:
    check(target, prefix + content)


@FUZZ
@given(mutations=mutation_lists)
def test_fuzz_unpickler_mutated_legacy_file(target: Path, mutations) -> None:
    check(target, mutate(LEGACY, mutations))


@FUZZ
@given(mutations=mutation_lists, cut=st.integers(min_value=0, max_value=40))
def test_fuzz_unpickler_mutated_data_pkl(target: Path, mutations, cut: int) -> None:
    pickled = mutate(RECORDS[PICKLE_NAME], mutations)
    pickled = pickled[: len(pickled) - cut]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in RECORDS.items():
            archive.writestr(name, pickled if name == PICKLE_NAME else data)
    check(target, buffer.getvalue())


@FUZZ
@given(mutations=mutation_lists)
def test_fuzz_unpickler_mutated_zip_bytes(target: Path, mutations) -> None:
    check(target, mutate(ZIPPED, mutations))
