"""Streaming, atomic safetensors writer.

The header is written first (every dtype and shape is known before any tensor exists),
then each tensor is produced, checked, written and dropped. The next tensors are produced
on worker threads while this one is written (`sdkit.io.ahead`), within a byte budget, so
peak memory is a few tensors and computing overlaps the disk. Bytes go to the disk
directly where the file system allows it (`sdkit.io.file_sink`), into a hidden partial
file beside the target (`sdkit.io.output_path`), which is fsynced and installed in one
rename only when complete (without `overwrite` it replaces nothing, not even a file that
another writer installed meanwhile); on any failure, Ctrl-C included, the partial file
is removed and the target is untouched, and partial files left by killed processes are
swept on the next write of the same target.

Tensor order and header layout follow `safetensors.torch.save_file` (descending dtype
alignment, then name; compact JSON; spaces to a multiple of 8), so for the same tensors
the bytes are identical. The reference writer orders `__metadata__` keys arbitrarily;
we sort them, so the two agree whenever metadata has at most one key. A writer may ask
for some tensors to be laid out `last` (e.g. a scale that is only known once its weight
is made): after the others, or after as many of them as keeps every tensor starting at a
multiple of its item size, which readers that map the file expect (byte tensors such as
JSON blobs come last in the reference order).

A metadata value `DATA_SHA256` asks for the sha256 of the file's data section (every
byte after the header, as ModelSpec's `hash_sha256` defines it): the sink hashes the
bytes as they go to the disk, and the digest is written over a placeholder of the same
length in the header before the file is made durable. It costs one sha256 pass over the
output (about 0.7 s of CPU per GiB); `SDKIT_DATA_HASH=off` writes no such key.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection, Mapping

from sdkit.errors import SdkitError
from sdkit.io.ahead import AHEAD_BUDGET, Prefetcher
from sdkit.io.byte_span import ByteSpan
from sdkit.io.file_sink import BufferedSink, DataDigest, DirectSink, open_sink
from sdkit.io.lazy import LazyTensor
from sdkit.io.output_path import write_file_atomically
from sdkit.io.safetensors_header import MAX_HEADER_SIZE

if TYPE_CHECKING:
    import torch

# dtype codes by increasing alignment, as the reference `Dtype` enum orders them
DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
               "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
               "C64", "F64", "I64", "U64")
_RANK = {code: rank for rank, code in enumerate(DTYPE_ORDER)}

# a metadata value the writer replaces with "0x" + the sha256 of the data section
DATA_SHA256 = "0x<sha256 of the tensor data>"

Progress = Callable[[int], None]
Cost = Callable[[str], int]
Finish = Callable[[Path], None]


def write_order(tensors: Mapping[str, LazyTensor], last: Collection[str] = ()) -> list[str]:
    """Names in the order their data is laid out: descending dtype alignment, then name;
    the names in `last` after as many of the others as keeps every tensor aligned."""
    order = sorted(tensors, key=lambda name: (-_RANK[tensors[name].dtype], name))
    if not last:
        return order
    rest, moved = [name for name in order if name not in last], [name for name in order if name in last]
    for cut in range(len(rest), 0, -1):
        candidate = rest[:cut] + moved + rest[cut:]
        if _aligned(tensors, candidate):
            return candidate
    return order


def _aligned(tensors: Mapping[str, LazyTensor], order: list[str]) -> bool:
    offset = 0
    for name in order:
        lazy = tensors[name]
        if lazy.nbytes and offset % _item_size(lazy) != 0:
            return False
        offset += lazy.nbytes
    return True


def _item_size(lazy: LazyTensor) -> int:
    count = math.prod(lazy.shape)
    return max(1, lazy.nbytes // count) if count else 1


def build_header(tensors: Mapping[str, LazyTensor], metadata: Mapping[str, str] | None,
                 order: list[str] | None = None) -> bytes:
    """The JSON header, padded with spaces to a multiple of 8 bytes (tensors laid out in
    `order`, by default `write_order`'s)."""
    document: dict[str, object] = {}
    if metadata is not None:
        document["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in order or write_order(tensors):
        lazy = tensors[name]
        document[name] = {"dtype": lazy.dtype, "shape": list(lazy.shape),
                          "data_offsets": [offset, offset + lazy.nbytes]}
        offset += lazy.nbytes
    raw = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def _check_text(path: Path, text: object, what: str) -> None:
    if not isinstance(text, str):
        raise SdkitError(f"{path}: {what} {text!r} is not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SdkitError(f"{path}: {what} {text!r} is not valid unicode") from None


def _check_request(path: Path, tensors: Mapping[str, LazyTensor],
                   metadata: Mapping[str, str] | None) -> None:
    from sdkit.io.dtypes import CODE_TO_TORCH

    for name, lazy in tensors.items():
        _check_text(path, name, "tensor name")
        if name == "__metadata__":
            raise SdkitError(f"{path}: a tensor cannot be named __metadata__")
        if not isinstance(lazy, LazyTensor) or lazy.dtype not in CODE_TO_TORCH:
            what = getattr(lazy, "dtype", lazy)
            raise SdkitError(f"{path}: tensor {name!r}: cannot write {what!r}")
        if not isinstance(lazy.shape, tuple) or not all(
                type(dim) is int and dim >= 0 for dim in lazy.shape):
            raise SdkitError(f"{path}: tensor {name!r}: shape {lazy.shape!r} is not a tuple of "
                             "non-negative integers")
    for key, value in (metadata or {}).items():
        _check_text(path, key, "metadata key")
        _check_text(path, value, f"metadata[{key!r}]")


Sink = BufferedSink | DirectSink


def _write_tensor(sink: Sink, path: Path, name: str, lazy: LazyTensor, tensor: object) -> int:
    import torch

    from sdkit.io.dtypes import CODE_TO_TORCH

    produced = (f"{tensor.dtype} {list(tensor.shape)}" if isinstance(tensor, torch.Tensor)
                else type(tensor).__name__)
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != CODE_TO_TORCH[lazy.dtype] \
            or tuple(tensor.shape) != lazy.shape:
        raise SdkitError(f"{path}: tensor {name!r} was declared {lazy.dtype} {list(lazy.shape)} "
                         f"but produced {produced}")
    return _write_bytes(sink, tensor)


def _write_bytes(sink: Sink, tensor: "torch.Tensor") -> int:
    import torch

    return sink.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _write_chunks(sink: Sink, path: Path, name: str, lazy: LazyTensor, ahead: Prefetcher) -> int:
    import torch

    from sdkit.io.dtypes import CODE_TO_TORCH

    assert lazy.chunks is not None
    written = 0
    for chunk in ahead.made_in_order(lazy.chunks()):
        if not isinstance(chunk, torch.Tensor) or chunk.dtype != CODE_TO_TORCH[lazy.dtype]:
            raise SdkitError(f"{path}: tensor {name!r} was declared {lazy.dtype} but a piece of it is "
                             f"{getattr(chunk, 'dtype', type(chunk).__name__)}")
        written += _write_bytes(sink, chunk)
    if written != lazy.nbytes:
        raise SdkitError(f"{path}: tensor {name!r} was declared {lazy.dtype} {list(lazy.shape)} "
                         f"({lazy.nbytes} bytes) but its pieces hold {written} bytes")
    return written


def _copy_tensor(sink: Sink, path: Path, name: str, lazy: LazyTensor, span: ByteSpan) -> int:
    if span.length != lazy.nbytes:
        raise SdkitError(f"{path}: tensor {name!r} was declared {lazy.dtype} {list(lazy.shape)} "
                         f"({lazy.nbytes} bytes) but its source holds {span.length} bytes")
    return sink.copy(span)


def _write_all(sink: Sink, path: Path, tensors: Mapping[str, LazyTensor], header: bytes, order: list[str],
               ahead: Prefetcher, spans: Mapping[str, ByteSpan], progress: Progress | None) -> None:
    sink.write(len(header).to_bytes(8, "little"))
    sink.write(header)
    # copied spans and tensors written in pieces are not produced ahead: the first needs
    # no producing, the second is produced piece by piece as it is written
    produced = [name for name in order if name not in spans and tensors[name].chunks is None]
    with ahead.start(produced):
        for name in order:
            if name in spans:
                written = _copy_tensor(sink, path, name, tensors[name], spans[name])
            elif tensors[name].chunks is not None:
                written = _write_chunks(sink, path, name, tensors[name], ahead)
            else:
                written = _write_tensor(sink, path, name, tensors[name], ahead.get(name))
            if progress is not None:
                progress(written)
    sink.finish()


def _with_digest_placeholder(metadata: Mapping[str, str] | None
                             ) -> tuple[Mapping[str, str] | None, str | None]:
    """`metadata` with each DATA_SHA256 value replaced by a random placeholder as long as
    the digest (so the header keeps its length when patched), and that placeholder.
    `SDKIT_DATA_HASH=off` leaves those keys out instead (a sha256 pass less)."""
    if metadata is None or DATA_SHA256 not in metadata.values():
        return metadata, None
    if os.environ.get("SDKIT_DATA_HASH", "").lower() in ("off", "0", "false", "no"):
        return {key: value for key, value in metadata.items() if value != DATA_SHA256}, None
    placeholder = "0x" + secrets.token_hex(32)
    return {key: placeholder if value == DATA_SHA256 else value
            for key, value in metadata.items()}, placeholder


def patch_header(file: Path, placeholder: str, value: str) -> None:
    """Write `value` over every `placeholder` in the safetensors header of `file` (same
    length, so the file stays valid): digests computed while the file was written."""
    old, new = placeholder.encode(), value.encode()
    assert len(old) == len(new)
    with open(file, "r+b") as handle:  # a writer's own descriptor may be O_DIRECT
        header = handle.read(int.from_bytes(handle.read(8), "little"))
        start = header.find(old)
        while start >= 0:
            handle.seek(8 + start)
            handle.write(new)
            start = header.find(old, start + 1)


def _spans(tensors: Mapping[str, LazyTensor]) -> dict[str, ByteSpan]:
    """The tensors whose bytes are copied from an input file as they are."""
    found = {}
    for name, lazy in tensors.items():
        span = lazy.span() if lazy.span is not None else None
        if span is not None:
            found[name] = span
    return found


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, LazyTensor],
                      metadata: Mapping[str, str] | None = None, *, overwrite: bool = False,
                      progress: Progress | None = None, workers: int = 1, cost: Cost | None = None,
                      finish: Finish | None = None, last: Collection[str] = ()) -> Path:
    """Write `tensors` (produced one at a time) to a safetensors file, atomically.

    `metadata` None writes no `__metadata__`; `progress(n)` is called after each tensor
    with the bytes just written. `workers` threads produce the next tensors ahead of the
    writer (0: produced on the calling thread), holding at most `AHEAD_BUDGET` bytes by
    `cost(name)` (default: the tensor's size). `finish(temp_path)` runs once every byte
    is written and before the file is made durable and renamed into place (e.g. to patch
    a digest computed meanwhile into the header). `last`: tensors to lay out after the
    others where alignment allows (`write_order`). Returns the path written.
    """
    path = Path(path)
    _check_request(path, tensors, metadata)
    if path.is_dir():
        raise SdkitError(f"{path}: is a folder")
    metadata, placeholder = _with_digest_placeholder(metadata)
    order = write_order(tensors, last)
    header = build_header(tensors, metadata, order)
    if len(header) > MAX_HEADER_SIZE:
        raise SdkitError(f"{path}: header would take {len(header)} bytes, over the "
                         f"{MAX_HEADER_SIZE}-byte limit of the format")
    digest = DataDigest(8 + len(header)) if placeholder is not None else None
    ahead = Prefetcher(lambda name: tensors[name].load(), workers,
                       cost=cost or (lambda name: tensors[name].nbytes), budget=AHEAD_BUDGET)

    def produce(partial: Path) -> None:
        file, sink = open_sink(partial, digest)
        with file:
            try:
                _write_all(sink, path, tensors, header, order, ahead, _spans(tensors), progress)
            finally:
                sink.close()
        if digest is not None and placeholder is not None:
            patch_header(partial, placeholder, "0x" + digest.hexdigest())
        if finish is not None:
            finish(partial)

    # refuses a target that another writer installed meanwhile, unless overwriting
    return write_file_atomically(path, produce, overwrite=overwrite)
