"""The streaming safetensors writer: same bytes as `safetensors.torch.save_file`, one
tensor in memory at a time, and never a partial or clobbered output."""

from __future__ import annotations

import json
import os
import signal
import struct
import weakref
from functools import partial
from pathlib import Path
from typing import Callable

import pytest
import safetensors
import safetensors.torch
import torch

from sdkit.errors import SdkitError
from sdkit.io import LazyTensor, lazy_tensors, model_from_tensors, write_safetensors
from sdkit.io.dtypes import CODE_TO_TORCH, TORCH_TO_CODE


@pytest.fixture(autouse=True, params=["direct", "buffered"])
def sink(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every writer test runs through both sinks: O_DIRECT from staging buffers (small
    ones here, so that tensors straddle them) and the page cache."""
    from sdkit.io import file_sink

    monkeypatch.setattr(file_sink, "STAGING", 2 * file_sink.BLOCK)
    monkeypatch.setenv("SDKIT_DIRECT_IO", "on" if request.param == "direct" else "off")
    return request.param


def lazy(tensor: torch.Tensor) -> LazyTensor:
    return LazyTensor(TORCH_TO_CODE[tensor.dtype], tuple(tensor.shape), lambda: tensor)


def mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    tensors = {f"w.{code}": torch.randn(3, 2, generator=generator).to(dtype)
               for code, dtype in CODE_TO_TORCH.items() if dtype.is_floating_point}
    tensors.update({
        "idx": torch.arange(7), "mask": torch.tensor([True, False, True]),
        "b": torch.tensor([-1, 2], dtype=torch.int8), "a": torch.tensor([1], dtype=torch.uint8),
        "u16": torch.tensor([5, 6]).to(torch.uint16), "u32": torch.tensor([7]).to(torch.uint32),
        "u64": torch.tensor([8]).to(torch.uint64), "i16": torch.tensor([9], dtype=torch.int16),
        "i32": torch.tensor([-9], dtype=torch.int32),
        "c": torch.randn(2, dtype=torch.complex64, generator=generator),
        "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4, dtype=torch.float16),
        "Zé": torch.ones(2, dtype=torch.float16), "_": torch.ones(1, dtype=torch.int32)})
    return tensors


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"},
                                      {"note": 'quote " backslash \\ tab \t nl \n \x01 é 漢 \x7f'}],
                         ids=["none", "empty", "one-key", "escapes"])
def test_bytes_equal_reference_writer(tmp_path: Path, metadata) -> None:
    tensors = mixed_tensors()
    reference = tmp_path / "reference.safetensors"
    safetensors.torch.save_file(tensors, reference, metadata=metadata)
    ours = write_safetensors(tmp_path / "ours.safetensors",
                             {name: lazy(t) for name, t in tensors.items()}, metadata)
    assert ours.read_bytes() == reference.read_bytes()


def test_round_trip_with_metadata_keys_sorted(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    metadata = {"zeta": "1", "alpha": "2", "mid": "3"}
    path = write_safetensors(tmp_path / "out.safetensors",
                             lazy_tensors(model_from_tensors(tensors)), metadata)
    loaded = safetensors.torch.load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8),
                           tensor.reshape(-1).view(torch.uint8))
    with safetensors.safe_open(str(path), "pt") as handle:
        assert handle.metadata() == metadata
    raw = path.read_bytes()
    header_size = struct.unpack("<Q", raw[:8])[0]
    assert header_size % 8 == 0
    header = json.loads(raw[8:8 + header_size])
    assert list(header["__metadata__"]) == ["alpha", "mid", "zeta"]


def test_non_contiguous_and_grad_tensors(tmp_path: Path) -> None:
    base = torch.randn(4, 5, requires_grad=True)
    tensors = {"t": base.t(), "s": base[:, ::2]}
    path = write_safetensors(tmp_path / "v.safetensors", {k: lazy(v) for k, v in tensors.items()})
    loaded = safetensors.torch.load_file(path)
    assert torch.equal(loaded["t"], base.t().detach())
    assert torch.equal(loaded["s"], base[:, ::2].detach())


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_tensors_alive_are_bounded_by_the_workers(tmp_path: Path, workers: int) -> None:
    """The tensor being written plus at most `workers` produced ahead of it."""
    alive: list[weakref.ref] = []
    most = [0]

    def producer(size: int) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:  # refcounting frees a dropped tensor at once
            tensor = torch.full((size,), float(size))
            alive.append(weakref.ref(tensor))
            most[0] = max(most[0], sum(ref() is not None for ref in alive))
            return tensor
        return load

    tensors = {f"t{i}": LazyTensor("F32", (1000 + i,), producer(1000 + i)) for i in range(8)}
    progress: list[int] = []
    path = write_safetensors(tmp_path / "s.safetensors", tensors, progress=progress.append, workers=workers)
    assert progress == [4 * (1000 + i) for i in range(8)]  # in write order, each once
    assert safetensors.torch.load_file(path)["t3"][0].item() == 1003.0
    assert most[0] <= workers + 1


def test_a_failing_producer_leaves_nothing(tmp_path: Path) -> None:
    def broken() -> torch.Tensor:
        raise SdkitError("the source went away")

    tensors = {f"t{i}": LazyTensor("F32", (4,), lambda: torch.zeros(4)) for i in range(6)}
    tensors["t3"] = LazyTensor("F32", (4,), broken)
    with pytest.raises(SdkitError, match="went away"):
        write_safetensors(tmp_path / "s.safetensors", tensors, workers=2)
    assert files_in(tmp_path) == []


def test_finish_runs_on_the_complete_file_before_the_rename(tmp_path: Path) -> None:
    target = tmp_path / "f.safetensors"
    seen = []

    def finish(partial: Path) -> None:
        seen.append((partial.name, partial.stat().st_size, target.exists()))

    write_safetensors(target, {"w": LazyTensor("F32", (4,), lambda: torch.ones(4))}, finish=finish)
    (name, size, existed), = seen
    assert name != target.name and size == target.stat().st_size and not existed


def test_existing_output_is_refused_before_any_work(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"precious")

    def never() -> torch.Tensor:
        raise AssertionError("a tensor was produced")

    with pytest.raises(SdkitError, match="already exists"):
        write_safetensors(target, {"w": LazyTensor("F32", (1,), never)})
    assert target.read_bytes() == b"precious" and files_in(tmp_path) == ["out.safetensors"]
    write_safetensors(target, {"w": lazy(torch.ones(1))}, overwrite=True)
    assert safetensors.torch.load_file(target)["w"].tolist() == [1.0]
    assert files_in(tmp_path) == ["out.safetensors"]


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
def test_failure_mid_write_leaves_nothing(tmp_path: Path, failure: BaseException) -> None:
    def explode() -> torch.Tensor:
        raise failure

    tensors = {"a": lazy(torch.ones(100)), "b": LazyTensor("F32", (3,), explode)}
    with pytest.raises(type(failure)):
        write_safetensors(tmp_path / "out.safetensors", tensors)
    assert files_in(tmp_path) == []


def test_failure_keeps_the_previous_output(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    safetensors.torch.save_file({"old": torch.zeros(2)}, target)
    before = target.read_bytes()
    bad = {"w": LazyTensor("F32", (2,), lambda: torch.zeros(3))}
    with pytest.raises(SdkitError):
        write_safetensors(target, bad, overwrite=True)
    assert target.read_bytes() == before and files_in(tmp_path) == ["out.safetensors"]


@pytest.mark.parametrize("declared,message", [
    (LazyTensor("F32", (2,), lambda: torch.zeros(2, dtype=torch.float16)), "torch.float16"),
    (LazyTensor("F32", (2,), lambda: torch.zeros(2, 1)), "[2, 1]"),
    (LazyTensor("F32", (2,), lambda: [0.0, 0.0]), "produced list"),
], ids=["dtype", "shape", "not-a-tensor"])
def test_mismatch_names_the_tensor(tmp_path: Path, declared: LazyTensor, message: str) -> None:
    tensors = {"ok": lazy(torch.ones(1)), "bad.key": declared}
    with pytest.raises(SdkitError, match="tensor 'bad.key' was declared F32") as error:
        write_safetensors(tmp_path / "out.safetensors", tensors)
    assert message in str(error.value)
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("tensors,metadata,message", [
    ({"w": LazyTensor("F4", (2,), torch.zeros)}, None, "cannot write 'F4'"),
    ({"w": LazyTensor("F32", [2], torch.zeros)}, None, "not a tuple"),
    ({"w": LazyTensor("F32", (-1,), torch.zeros)}, None, "not a tuple"),
    ({"__metadata__": LazyTensor("F32", (1,), torch.zeros)}, None, "cannot be named"),
    ({}, {"k": 1}, "metadata['k'] 1 is not a string"),
    ({}, {"\ud800": "x"}, "not valid unicode"),
], ids=["sub-byte", "list-shape", "negative", "reserved-name", "int-metadata", "surrogate"])
def test_bad_requests(tmp_path: Path, tensors, metadata, message: str) -> None:
    with pytest.raises(SdkitError, match="out.safetensors") as error:
        write_safetensors(tmp_path / "out.safetensors", tensors, metadata)
    assert message in str(error.value)
    assert files_in(tmp_path) == []


def test_unwritable_destinations(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SdkitError, match="cannot write"):
        write_safetensors(blocker / "out.safetensors", {"w": lazy(torch.ones(1))})
    with pytest.raises(SdkitError, match="cannot write: No such file"):
        write_safetensors(tmp_path / "missing" / "out.safetensors", {"w": lazy(torch.ones(1))})
    with pytest.raises(SdkitError, match="is a folder"):
        write_safetensors(tmp_path, {"w": lazy(torch.ones(1))}, overwrite=True)


def test_disk_full_is_a_clean_error(tmp_path: Path) -> None:
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(SdkitError, match="cannot write: File too large"):
            write_safetensors(tmp_path / "out.safetensors", {"w": lazy(torch.ones(1 << 18))})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert files_in(tmp_path) == []


def test_a_tensor_written_in_pieces(tmp_path: Path) -> None:
    values = torch.arange(10, dtype=torch.float32)

    def pieces(*sizes: int, dtype: torch.dtype = torch.float32) -> Callable[[], object]:
        def produce():
            start = 0
            for size in sizes:
                yield values[start:start + size].to(dtype)
                start += size
        return produce

    def never() -> torch.Tensor:
        raise AssertionError("a tensor written in pieces is never loaded whole")

    good = LazyTensor("F32", (2, 5), never, chunks=pieces(4, 4, 2))
    path = write_safetensors(tmp_path / "p.safetensors", {"w": good, "b": lazy(torch.ones(3))})
    assert torch.equal(safetensors.torch.load_file(path)["w"], values.reshape(2, 5))
    for wrong, problem in ((pieces(4, 4), "pieces hold 32 bytes"), (pieces(4, 6, dtype=torch.float16), "F16|float16")):
        with pytest.raises(SdkitError, match=problem):
            write_safetensors(tmp_path / "bad.safetensors", {"w": LazyTensor("F32", (2, 5), never, chunks=wrong)})
        assert not (tmp_path / "bad.safetensors").exists()
    assert files_in(tmp_path) == ["p.safetensors"]


@pytest.mark.parametrize("workers", [0, 2])
def test_pieces_given_as_functions_are_made_ahead_and_written_in_order(tmp_path: Path, workers: int) -> None:
    import threading
    import time

    values = torch.arange(64, dtype=torch.float32)
    makers: set[str] = set()

    def piece(start: int) -> torch.Tensor:
        time.sleep(0.002 * (8 - start // 8))  # the first pieces finish last
        makers.add(threading.current_thread().name)
        return values[start:start + 8].clone()

    def produce():  # functions and ready tensors mixed
        for start in range(0, 64, 8):
            yield values[start:start + 8] if start == 24 else partial(piece, start)

    tensors = {"w": LazyTensor("F32", (8, 8), lambda: values, chunks=produce)}
    path = write_safetensors(tmp_path / "p.safetensors", tensors, workers=workers)
    assert torch.equal(safetensors.torch.load_file(path)["w"], values.reshape(8, 8))
    on_workers = all(name.startswith("sdkit-ahead") for name in makers)
    assert on_workers == (workers > 0)

    def broken_piece() -> torch.Tensor:
        raise SdkitError("piece 2 failed")

    def failing():
        yield partial(piece, 0)
        yield broken_piece

    with pytest.raises(SdkitError, match="piece 2 failed"):
        write_safetensors(tmp_path / "bad.safetensors", {"w": LazyTensor("F32", (2, 8), lambda: values, chunks=failing)},
                          workers=workers)
    assert files_in(tmp_path) == ["p.safetensors"]


def test_finished_stretches_are_sent_to_disk_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            sink: str) -> None:
    from sdkit.io import writeback

    if sink == "direct" or writeback._sync_file_range is None:
        pytest.skip("write-out requests are for writes through the page cache (on Linux)")
    requests: list[tuple[int, int]] = []
    real = writeback._sync_file_range

    def spy(fileno: int, offset: int, count: int, flags: int) -> int:
        assert os.fstat(fileno).st_size >= offset + count  # only bytes already written
        requests.append((offset, count))
        return real(fileno, offset, count, flags)

    monkeypatch.setattr(writeback, "_sync_file_range", spy)
    monkeypatch.setattr(writeback, "STEP", 1000)
    tensors = {f"t{i}": torch.full((100 + i,), float(i)) for i in range(40)}
    ours = write_safetensors(tmp_path / "ours.safetensors", {name: lazy(t) for name, t in tensors.items()})
    safetensors.torch.save_file(tensors, tmp_path / "reference.safetensors")
    assert ours.read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    # contiguous stretches from the first byte, each at least a step, never past the end
    assert requests and requests[0][0] == 0
    assert all(offset == before + count for (before, count), (offset, _) in zip(requests, requests[1:]))
    assert all(count >= 1000 for _, count in requests)
    assert sum(count for _, count in requests) > ours.stat().st_size - 1000 - 4 * 140


def test_write_out_requests_stop_where_the_file_system_refuses_them(tmp_path: Path) -> None:
    from sdkit.io.writeback import EarlyWriteback

    reader, writer = os.pipe()  # sync_file_range refuses pipes (ESPIPE)
    try:
        early = EarlyWriteback(writer, step=1)
        os.write(writer, b"xy")
        early.written_to(2)
        assert not early.enabled and not early.due(10)
    finally:
        os.close(reader)
        os.close(writer)


def test_unchanged_tensors_copied_from_a_file_keep_their_bytes(tmp_path: Path) -> None:
    from sdkit.io import open_model

    generator = torch.Generator().manual_seed(5)
    tensors = {"big": torch.randn(3000, generator=generator), "odd": torch.randn(7, generator=generator).half(),
               "mid": torch.randn(1500, generator=generator).bfloat16()}
    source = tmp_path / "source.safetensors"
    safetensors.torch.save_file(tensors, source)
    with open_model(source) as model:
        lazies = lazy_tensors(model)
        assert all(lazy.span is not None and lazy.span() is not None for lazy in lazies.values())
        lazies["extra"] = lazy(torch.arange(5))  # produced, between copied ones
        copied = write_safetensors(tmp_path / "copied.safetensors", lazies)
    safetensors.torch.save_file({**tensors, "extra": torch.arange(5)}, tmp_path / "reference.safetensors")
    assert copied.read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_a_file_system_refusing_direct_writes_gets_buffered_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 sink: str) -> None:
    import errno
    import fcntl

    from sdkit.io import file_sink

    if sink != "direct" or not hasattr(os, "O_DIRECT"):
        pytest.skip("about direct writes")
    real, refused = os.pwrite, []

    def refuse_direct(fileno: int, data, offset: int) -> int:
        if fcntl.fcntl(fileno, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fileno, data, offset)

    monkeypatch.setattr(file_sink.os, "pwrite", refuse_direct)
    tensors = mixed_tensors() | {"long": torch.arange(5000, dtype=torch.float32)}
    ours = write_safetensors(tmp_path / "ours.safetensors", {name: lazy(t) for name, t in tensors.items()})
    safetensors.torch.save_file(tensors, tmp_path / "reference.safetensors")
    assert refused == [0]  # refused once, then buffered from where it stood
    assert ours.read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_tensors_asked_last_are_laid_out_after_the_others(tmp_path: Path) -> None:
    tensors = {"w": torch.ones(4, 4, dtype=torch.float16), "w.scale": torch.tensor(2.0), "b": torch.ones(3)}
    out = write_safetensors(tmp_path / "out.safetensors", {n: lazy(t) for n, t in tensors.items()},
                            last=["w.scale"])
    header = json.loads(out.read_bytes()[8:8 + struct.unpack("<Q", out.read_bytes()[:8])[0]])
    starts = {name: header[name]["data_offsets"][0] for name in tensors}
    assert starts["w.scale"] == max(starts.values())  # after the float16 weight it is known from
    assert starts["w.scale"] % 4 == 0
    assert safetensors.torch.load_file(out).keys() == tensors.keys()
    assert all(torch.equal(safetensors.torch.load_file(out)[n], t) for n, t in tensors.items())


def test_an_order_that_would_misalign_a_tensor_keeps_the_reference_layout(tmp_path: Path) -> None:
    # 3 bytes of float8 before a float32 moved last would start it at an odd offset
    tensors = {"w": torch.ones(3).to(torch.float8_e4m3fn), "w.scale": torch.tensor(2.0)}
    moved = write_safetensors(tmp_path / "moved.safetensors", {n: lazy(t) for n, t in tensors.items()},
                              last=["w.scale"])
    reference = tmp_path / "reference.safetensors"
    safetensors.torch.save_file(tensors, reference)
    assert moved.read_bytes() == reference.read_bytes()
