"""PyTorch checkpoints through the restricted unpickler: tensors match `torch.load`
(weights_only), the flattening rule holds, tied storages stay tied, and no pickled code
ever runs."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from sdkit.errors import SdkitError
from sdkit.io import open_model

LAYOUTS = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])


def save(obj: Any, path: Path, zip_format: bool = True) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return path


def sample_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=generator)
    return {
        "f32": base, "f16": base.half() * 3, "bf16": base.bfloat16(), "f64": base.double(),
        "i64": torch.arange(5), "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([250, 3], dtype=torch.uint8), "bool": torch.tensor([True, False]),
        "c64": torch.randn(3, dtype=torch.complex64, generator=generator),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
        "transposed": base.t(), "strided": base[:, ::2],
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }


@LAYOUTS
def test_tensors_match_torch_load(tmp_path: Path, zip_format: bool) -> None:
    path = save(sample_state(), tmp_path / "model.ckpt", zip_format)
    expected = torch.load(path, weights_only=True)
    with open_model(path) as model:
        assert model.format == "pickle"
        assert model.keys() == list(expected)
        assert model.extra == {} and model.metadata == {}
        for name, tensor in expected.items():
            loaded = model.load(name)
            assert model.info(name).shape == tuple(tensor.shape)
            assert loaded.dtype == tensor.dtype and loaded.stride() == tensor.stride()
            assert torch.equal(loaded, tensor.detach()), name


def test_new_dtypes_use_rebuild_v3(tmp_path: Path) -> None:
    tensors = {"f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
               "u16": torch.tensor([1, 60000]).to(torch.uint16)}
    path = save(tensors, tmp_path / "new.pt")
    expected = torch.load(path, weights_only=True)
    with open_model(path) as model:
        assert {k: model.info(k).dtype for k in model} == {"f8": "F8_E4M3", "u16": "U16"}
        for name in tensors:
            assert model.load(name).view(torch.uint8).tolist() == \
                expected[name].view(torch.uint8).tolist()


@LAYOUTS
def test_lightning_wrapper_is_unwrapped(tmp_path: Path, zip_format: bool) -> None:
    weights = {"model.diffusion_model.w": torch.ones(2, 3), "cond_stage_model.b": torch.zeros(4)}
    checkpoint = {"state_dict": weights, "global_step": 470000, "epoch": 6,
                  "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}}]}
    path = save(checkpoint, tmp_path / "sd.ckpt", zip_format)
    with open_model(path) as model:
        assert model.keys() == list(weights)
        assert model.extra == {"global_step": 470000, "epoch": 6}
        assert model.metadata == {"global_step": "470000", "epoch": "6"}
        assert torch.equal(model.load("model.diffusion_model.w"), torch.ones(2, 3))


def test_doubly_wrapped_state_dict(tmp_path: Path) -> None:
    checkpoint = {"state_dict": {"state_dict": {"w": torch.ones(2)}, "note": "inner"},
                  "global_step": 3}
    with open_model(save(checkpoint, tmp_path / "kohya.ckpt")) as model:
        assert model.keys() == ["w"]
        assert model.extra == {"global_step": 3, "note": "inner"}


def test_a1111_embedding(tmp_path: Path) -> None:
    vectors = torch.randn(2, 768)
    embedding = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors},
                 "name": "my-style", "step": 1500, "sd_checkpoint": "a9263745",
                 "sd_checkpoint_name": "v1-5-pruned"}
    with open_model(save(embedding, tmp_path / "my-style.pt")) as model:
        assert model.keys() == ["string_to_param.*"]
        assert torch.equal(model.load("string_to_param.*"), vectors)
        assert model.extra == {"string_to_token": {"*": 265}, "name": "my-style", "step": 1500,
                               "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5-pruned"}
        assert model.metadata["name"] == "my-style" and model.metadata["step"] == "1500"


def test_a1111_hypernetwork(tmp_path: Path) -> None:
    def layers() -> OrderedDict:
        return OrderedDict([("linear.0.weight", torch.randn(1536, 768)),
                            ("linear.0.bias", torch.randn(1536)),
                            ("linear.1.weight", torch.randn(768, 1536)),
                            ("linear.1.bias", torch.randn(768))])

    hypernetwork = {768: (layers(), layers()), 320: (layers(), layers()),
                    "step": 2000, "name": "hn", "layer_structure": [1, 2, 1],
                    "activation_func": "relu", "is_layer_norm": False, "use_dropout": False}
    with open_model(save(hypernetwork, tmp_path / "hn.pt")) as model:
        assert model.keys()[:5] == ["768.0.linear.0.weight", "768.0.linear.0.bias",
                                    "768.0.linear.1.weight", "768.0.linear.1.bias",
                                    "768.1.linear.0.weight"]
        assert len(model) == 16
        assert torch.equal(model.load("320.1.linear.1.bias"), hypernetwork[320][1]["linear.1.bias"])
        assert model.extra == {"step": 2000, "name": "hn", "layer_structure": [1, 2, 1],
                               "activation_func": "relu", "is_layer_norm": False,
                               "use_dropout": False}


def test_non_tensor_values_inside_tensor_containers(tmp_path: Path) -> None:
    obj = {"blocks": [{"w": torch.ones(1), "kind": "conv", "cfg": {"k": 3}}, "plain"]}
    with open_model(save(obj, tmp_path / "mixed.pt")) as model:
        assert model.keys() == ["blocks.0.w"]
        assert model.extra == {"blocks.0.kind": "conv", "blocks.0.cfg": {"k": 3}, "blocks.1": "plain"}


def test_bare_tensor_is_named_empty(tmp_path: Path) -> None:
    with open_model(save(torch.arange(3.0), tmp_path / "raw.pt")) as model:
        assert model.keys() == [""]
        assert model.load("").tolist() == [0.0, 1.0, 2.0]


@LAYOUTS
def test_tied_weights_share_storage(tmp_path: Path, zip_format: bool) -> None:
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # tied, as in many text encoders
    base = torch.arange(12.0)
    state = {"embed.weight": embedding.weight, "head.weight": head.weight,
             "first": base[:6].view(2, 3), "second": base[6:].view(3, 2)}
    path = save(state, tmp_path / "tied.pt", zip_format)
    with open_model(path) as model:
        assert model.extra == {"__shared__": [["embed.weight", "head.weight"]]}
        embed, tied = model.load("embed.weight"), model.load("head.weight")
        assert torch.equal(embed, embedding.weight.detach())
        assert embed.untyped_storage().data_ptr() == tied.untyped_storage().data_ptr()
        first, second = model.load("first"), model.load("second")
        assert first.tolist() == [[0, 1, 2], [3, 4, 5]]
        assert second.tolist() == [[6, 7], [8, 9], [10, 11]]
        assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()


def test_edits_of_loaded_tensors_never_reach_the_file(tmp_path: Path) -> None:
    path = save({"w": torch.ones(3)}, tmp_path / "w.pt")
    before = path.read_bytes()
    with open_model(path) as model:
        loaded = model.load("w")
        loaded.add_(1)
    assert loaded.tolist() == [2.0, 2.0, 2.0] and path.read_bytes() == before


# ---- code in pickles never runs -------------------------------------------------------

def make_payload(target: Any, *args: Any) -> Any:
    class Payload:
        def __reduce__(self) -> tuple:
            return target, args

    return Payload()


def payloads(marker: Path) -> list[tuple[Any, str]]:
    return [
        (make_payload(os.system, f"touch {marker}"), f"'{os.system.__module__}.system'"),
        (make_payload(builtins.eval, f"open({str(marker)!r}, 'w')"), "'builtins.eval'"),
        (make_payload(subprocess.Popen, ["touch", str(marker)]), "'subprocess.Popen'"),
        (make_payload(builtins.exec, f"open({str(marker)!r}, 'w')"), "'builtins.exec'"),
    ]


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("container", ["plain-pickle", "torch-zip", "torch-legacy"])
def test_evil_pickles_are_refused_without_running(tmp_path: Path, index: int,
                                                  container: str) -> None:
    marker = tmp_path / "PWNED"
    payload, global_name = payloads(marker)[index]
    path = tmp_path / "evil.pt"
    obj = {"weight": torch.ones(2), "nested": {"deeper": [payload]}}
    if container == "plain-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        save(obj, path, zip_format=container == "torch-zip")
    with pytest.raises(SdkitError, match="refused pickle: forbidden global") as error:
        open_model(path)
    assert global_name in str(error.value)
    assert not marker.exists()


def _replace_record(path: Path, suffix: str, content: bytes,
                    compression: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path) as source:
        records = {info.filename: source.read(info) for info in source.infolist()}
    with zipfile.ZipFile(path, "w", compression=compression) as target:
        for name, data in records.items():
            target.writestr(name, content if name.endswith(suffix) else data)


def test_evil_data_pkl_inside_a_real_zip(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = save({"w": torch.ones(2)}, tmp_path / "model.ckpt")
    _replace_record(path, "/data.pkl", pickle.dumps(
        {"w": make_payload(os.system, f"touch {marker}")}, protocol=2))
    with pytest.raises(SdkitError, match="forbidden global"):
        open_model(path)
    assert not marker.exists()


# ---- damaged files ----------------------------------------------------------------------

def test_compressed_storage_is_refused(tmp_path: Path) -> None:
    path = save({"w": torch.ones(64)}, tmp_path / "deflated.ckpt")
    _replace_record(path, "/version", b"3\n", compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(SdkitError, match="compressed"):
        open_model(path)


def test_missing_storage_record(tmp_path: Path) -> None:
    path = save({"w": torch.ones(4)}, tmp_path / "m.ckpt")
    with zipfile.ZipFile(path) as source:
        records = {i.filename: source.read(i) for i in source.infolist() if "/data/" not in i.filename}
    with zipfile.ZipFile(path, "w") as target:
        for name, data in records.items():
            target.writestr(name, data)
    with pytest.raises(SdkitError, match="storage '0' is missing"):
        open_model(path)


@LAYOUTS
def test_truncated_checkpoints(tmp_path: Path, zip_format: bool) -> None:
    path = save({"w": torch.ones(1000)}, tmp_path / "cut.ckpt", zip_format)
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(SdkitError, match="not a valid checkpoint"):
        open_model(path)


def test_plain_pickle_without_torch_magic(tmp_path: Path) -> None:
    path = tmp_path / "config.pt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(SdkitError, match="magic number missing"):
        open_model(path)


def test_not_a_checkpoint_at_all(tmp_path: Path) -> None:
    path = tmp_path / "notes.bin"
    path.write_bytes(b"hello world, not a model")
    with pytest.raises(SdkitError, match="not a PyTorch checkpoint"):
        open_model(path)


class _Forged:
    """Pickles as an arbitrary call of an allowed global with arguments we choose."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple:
        return self.function, self.args


class _ForgingPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, _Storage) else None


class _Storage:
    def __init__(self, numel: int) -> None:
        self.pid = ("storage", torch.FloatStorage, "0", "cpu", numel)


def forged_checkpoint(path: Path, obj: Any, storage_bytes: bytes) -> Path:
    """A torch zip archive whose data.pkl we write ourselves."""
    buffer = io.BytesIO()
    _ForgingPickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", b"little")
        archive.writestr("archive/data/0", storage_bytes)
    return path


def rebuild(storage: _Storage, offset: int, size: tuple, stride: tuple) -> _Forged:
    return _Forged(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False,
                   OrderedDict())


def test_forged_view_past_the_storage_is_refused(tmp_path: Path) -> None:
    storage = _Storage(4)
    path = forged_checkpoint(tmp_path / "oob.ckpt", {"w": rebuild(storage, 2, (2, 2), (2, 1))},
                             b"\0" * 16)
    with pytest.raises(SdkitError, match="reaches past the end of storage"):
        open_model(path)


def test_forged_storage_larger_than_its_record(tmp_path: Path) -> None:
    storage = _Storage(1000)
    path = forged_checkpoint(tmp_path / "big.ckpt", {"w": rebuild(storage, 0, (4,), (1,))},
                             b"\0" * 16)
    with pytest.raises(SdkitError, match="has 16 bytes, 4000 declared"):
        open_model(path)


def test_forged_views_load_like_torch(tmp_path: Path) -> None:
    storage = _Storage(6)
    values = torch.arange(6.0)
    obj = {"t": rebuild(storage, 1, (2, 2), (1, 2)), "s": rebuild(storage, 5, (), ())}
    path = forged_checkpoint(tmp_path / "views.ckpt", obj, values.numpy().tobytes())
    with open_model(path) as model:
        assert model.load("t").tolist() == [[1.0, 3.0], [2.0, 4.0]]
        assert model.load("s").item() == 5.0


@pytest.mark.parametrize("obj,message", [
    ({"a.b": "TENSOR", "a": {"b": "TENSOR"}}, "same name 'a.b'"),
    ({"s": [{"TENSOR"}]}, "inside a set"),
])
def test_unflattenable_objects(tmp_path: Path, obj: Any, message: str) -> None:
    storage = _Storage(1)
    tensor = rebuild(storage, 0, (1,), (1,))

    def substitute(value: Any) -> Any:
        if value == "TENSOR":
            return tensor
        if isinstance(value, dict):
            return {k: substitute(v) for k, v in value.items()}
        if isinstance(value, list):
            return [substitute(v) for v in value]
        if isinstance(value, set):
            return _Forged(set, [tensor])
        return value

    path = forged_checkpoint(tmp_path / "odd.ckpt", substitute(obj), b"\0" * 4)
    with pytest.raises(SdkitError, match=message):
        open_model(path)


def test_self_referencing_container(tmp_path: Path) -> None:
    storage = _Storage(1)
    loop: list[Any] = [rebuild(storage, 0, (1,), (1,))]
    loop.append(loop)
    path = forged_checkpoint(tmp_path / "loop.ckpt", {"loop": loop}, b"\0" * 4)
    with pytest.raises(SdkitError, match="a container contains itself"):
        open_model(path)


@pytest.mark.parametrize("opcodes", [
    b"N" + b"r" + (2**28).to_bytes(4, "little"),  # LONG_BINPUT at memo index 268 million
    b"X" + (2**31).to_bytes(4, "little") + b"abc",  # BINUNICODE claiming 2 GB
    b"\x96" + (2**33).to_bytes(8, "little"),  # BYTEARRAY8 claiming 8 GB
], ids=["memo-index", "string-length", "bytearray-length"])
def test_corrupt_lengths_do_not_allocate(tmp_path: Path, opcodes: bytes) -> None:
    resource = pytest.importorskip("resource")
    path = tmp_path / "bomb.pt"
    path.write_bytes(b"\x80\x05" + opcodes + b".")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(SdkitError, match="not a valid checkpoint"):
        open_model(path)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 256 * 1024
