"""Open PyTorch checkpoints (`.ckpt .pt .pth .bin`) without running any pickled code.

Both layouts `torch.save` has used are read:
- zip (PyTorch >= 1.6): `<dir>/data.pkl` holds the object, `<dir>/data/<key>` the raw
  bytes of each storage, stored uncompressed, so they are memory-mapped in place;
- legacy (older): magic number, protocol, system info and the object as consecutive
  pickles, then the list of storage keys, then each storage as an 8-byte element count
  followed by its bytes.
Storages are mapped once per file and shared by all tensors viewing them, so tied weights
load as views of one buffer (compare `untyped_storage().data_ptr()`); names of tensors
that are the very same view are listed in `extra["__shared__"]` as sorted groups.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import weakref
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sdkit.errors import SdkitError
from sdkit.io.flatten import FlattenError, Flattened, flatten_checkpoint
from sdkit.io.mapped import map_region, tensor_from_mapping, torch_dtype
from sdkit.io.model_file import DTYPE_BITS, ModelFile, TensorInfo
from sdkit.io.pickle_guard import PickleGuard
from sdkit.io.unpickler import PickledTensor, StorageRef, printable, restricted_load

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_PICKLE_BYTES = 64 << 20  # data.pkl of the largest real checkpoints is a few MB
# the bytes all tensor names claim, against the file's size: tied weights repeat a
# storage under a few names; a file whose views claim more is built to amplify
_MAX_CLAIM_FACTOR = 4
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


def _invalid(path: Path, what: str) -> SdkitError:
    return SdkitError(f"{path}: not a valid checkpoint: {what}")


class _ZipStorages:
    """Finds storage records of a torch zip archive and their offsets in the file."""

    def __init__(self, path: Path, file: BinaryIO, archive: zipfile.ZipFile, prefix: str) -> None:
        self.path, self.file, self.archive, self.prefix = path, file, archive, prefix
        self.file_size = os.fstat(file.fileno()).st_size
        self.refs: dict[str, StorageRef] = {}

    def resolve(self, key: str, dtype: str, nbytes: int) -> StorageRef:
        ref = self.refs.get(key)
        if ref is None:
            ref = self.refs[key] = StorageRef(key, dtype, nbytes)
            ref.file_offset = self._record_offset(key, nbytes)
        elif ref.dtype != dtype or ref.nbytes != nbytes:
            raise _invalid(self.path, f"storage {printable(key)!r} is declared twice differently")
        return ref

    def _record_offset(self, key: str, nbytes: int) -> int:
        try:
            record = self.archive.getinfo(f"{self.prefix}data/{key}")
        except KeyError:
            raise _invalid(self.path, f"storage {printable(key)!r} is missing from the archive") from None
        if record.compress_type != zipfile.ZIP_STORED:
            raise _invalid(self.path, f"storage {printable(key)!r} is compressed; PyTorch stores them raw")
        if record.file_size < nbytes:
            raise _invalid(self.path, f"storage {printable(key)!r} has {record.file_size} bytes, "
                                      f"{nbytes} declared")
        self.file.seek(record.header_offset)
        local = self.file.read(_LOCAL_HEADER.size)
        if len(local) < _LOCAL_HEADER.size or local[:4] != b"PK\x03\x04":
            raise _invalid(self.path, f"storage {printable(key)!r}: broken zip entry")
        name_length, extra_length = _LOCAL_HEADER.unpack(local)[1:]
        offset = record.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if offset + nbytes > self.file_size:
            raise _invalid(self.path, f"storage {printable(key)!r} runs past the end of the file")
        return offset


def _read_record(path: Path, archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    record = archive.getinfo(name)
    if record.file_size > limit:
        raise _invalid(path, f"{name} declares {record.file_size:,} bytes (sdkit's limit: {limit:,})")
    try:
        return archive.read(record)
    except Exception as exc:  # zipfile raises a wide variety on damaged entries
        raise _invalid(path, f"cannot read {name} ({exc.__class__.__name__}: {exc})") from None


def _archive_prefix(path: Path, archive: zipfile.ZipFile) -> str:
    pickles = [name for name in archive.namelist()
               if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise _invalid(path, "zip archive without exactly one <dir>/data.pkl "
                             "(not a torch.save file)")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = f"{prefix}byteorder"
    if byteorder in archive.namelist() and _read_record(path, archive, byteorder, 16) != b"little":
        raise _invalid(path, "big-endian checkpoints are not supported")
    return prefix


def _load_zip(path: Path, file: BinaryIO) -> Any:
    try:
        archive = zipfile.ZipFile(file)
    except Exception as exc:  # BadZipFile, struct.error, OverflowError, ... on damaged archives
        raise _invalid(path, f"broken zip archive ({exc.__class__.__name__}: {exc})") from None
    with archive:
        prefix = _archive_prefix(path, archive)
        pickled = _read_record(path, archive, f"{prefix}data.pkl", _MAX_PICKLE_BYTES)
        storages = _ZipStorages(path, file, archive, prefix)
        return restricted_load(io.BytesIO(pickled), path, storages.resolve)


def _load_legacy(path: Path, file: BinaryIO) -> Any:
    refs: dict[str, StorageRef] = {}

    def no_storage(key: str, dtype: str, nbytes: int) -> StorageRef:
        raise _invalid(path, "storage reference outside the checkpoint object")

    def record(key: str, dtype: str, nbytes: int) -> StorageRef:
        ref = refs.setdefault(key, StorageRef(key, dtype, nbytes))
        if ref.dtype != dtype or ref.nbytes != nbytes:
            raise _invalid(path, f"storage {printable(key)!r} is declared twice differently")
        return ref

    guard = PickleGuard()  # one budget for the file's five pickles
    if restricted_load(file, path, no_storage, guard) != _LEGACY_MAGIC:
        raise _invalid(path, "not a torch.save file (magic number missing)")
    if restricted_load(file, path, no_storage, guard) != _LEGACY_PROTOCOL:
        raise _invalid(path, "unsupported legacy protocol version")
    system = restricted_load(file, path, no_storage, guard)
    if not isinstance(system, dict) or system.get("little_endian") is not True:
        raise _invalid(path, "big-endian checkpoints are not supported")
    obj = restricted_load(file, path, record, guard)
    keys = restricted_load(file, path, no_storage, guard)
    _locate_legacy_storages(path, file, refs, keys)
    return obj


def _locate_legacy_storages(path: Path, file: BinaryIO, refs: dict[str, StorageRef],
                            keys: Any) -> None:
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys) \
            or len(set(keys)) != len(keys) or set(keys) != set(refs):
        raise _invalid(path, "storage list does not match the storages the object uses")
    file_size = os.fstat(file.fileno()).st_size
    position = file.tell()
    for key in keys:
        ref = refs[key]
        file.seek(position)
        count = int.from_bytes(file.read(8), "little", signed=True)
        ref.file_offset = position + 8
        position = ref.file_offset + count * DTYPE_BITS[ref.dtype] // 8
        if count * DTYPE_BITS[ref.dtype] != ref.nbytes * 8 or position > file_size:
            raise _invalid(path, f"storage {printable(key)!r} is truncated or has the wrong size")


class _CheckpointTensors:
    """Materializes placeholders; each storage is mapped once and shared by its views."""

    def __init__(self, path: Path, fileno: int, tensors: dict[str, PickledTensor]) -> None:
        self.path = path
        self.fileno: int | None = fileno
        self.tensors = tensors
        # weak: a storage's mapping lives as long as some loaded tensor uses it, so a
        # streaming consumer holds one storage at a time, while tied views still share one
        self.mappings: weakref.WeakValueDictionary[str, mmap.mmap] = weakref.WeakValueDictionary()

    def load(self, name: str) -> "torch.Tensor":
        return self.view(self.tensors[name], name)

    def view(self, placeholder: PickledTensor, name: str) -> "torch.Tensor":
        """The tensor `placeholder` describes, over the file's mapped bytes."""
        import torch

        dtype = torch_dtype(placeholder.dtype, f"{self.path}: tensor {name!r}")
        if 0 in placeholder.shape:
            return torch.empty(placeholder.shape, dtype=dtype)
        mapping, start = self._mapping(placeholder.storage, name)
        count = placeholder.storage.nbytes // dtype.itemsize
        flat = tensor_from_mapping(mapping, start, dtype, count)
        return flat.as_strided(placeholder.shape, placeholder.stride, placeholder.offset)

    def _mapping(self, storage: StorageRef, name: str) -> tuple[mmap.mmap, int]:
        if self.fileno is None:
            raise SdkitError(f"{self.path}: file was closed before tensor {name!r} was loaded")
        mapping = self.mappings.get(storage.key)
        if mapping is None:
            mapping, start = map_region(self.fileno, storage.file_offset, storage.nbytes)
            self.mappings[storage.key] = mapping
            return mapping, start
        return mapping, storage.file_offset % mmap.ALLOCATIONGRANULARITY

    def close(self) -> None:
        self.mappings.clear()  # loaded tensors keep their own mappings alive
        if self.fileno is not None:
            os.close(self.fileno)
            self.fileno = None


def _shared_groups(tensors: dict[str, PickledTensor]) -> list[list[str]]:
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, placeholder in tensors.items():
        groups.setdefault(placeholder.view_key(), []).append(name)
    return sorted(sorted(names) for names in groups.values() if len(names) > 1)


def _read_object(path: Path, file: BinaryIO) -> Any:
    start = file.read(9)
    file.seek(0)
    if start.startswith(b"PK\x03\x04"):
        return _load_zip(path, file)
    if start[:1] == b"\x80":
        return _load_legacy(path, file)
    hint = " (it looks like safetensors; name it .safetensors)" if start[8:] == b"{" else ""
    raise SdkitError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle){hint}")


def _flatten(path: Path, obj: Any) -> Flattened:
    try:
        return flatten_checkpoint(obj)
    except FlattenError as exc:
        raise _invalid(path, str(exc)) from None


def check_claims(path: Path, claimed: int, file_size: int) -> None:
    """Refuse views that together claim far more bytes than the file holds."""
    if claimed > _MAX_CLAIM_FACTOR * file_size:
        raise _invalid(path, f"its tensors claim {claimed:,} bytes, more than {_MAX_CLAIM_FACTOR} times "
                             f"the file's {file_size:,} (the same storage viewed under many names)")


def open_checkpoint(path: Path) -> ModelFile:
    """ModelFile over a torch.save file; tensors are mapped lazily on load."""
    fileno = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        with os.fdopen(os.dup(fileno), "rb") as file:
            obj = _read_object(path, file)
        flat = _flatten(path, obj)
        size = os.fstat(fileno).st_size
        check_claims(path, sum(tensor.nbytes for tensor in flat.tensors.values()), size)
    except BaseException:
        os.close(fileno)
        raise
    infos = {name: TensorInfo(name, t.dtype, t.shape) for name, t in flat.tensors.items()}
    extra = dict(flat.extra)
    shared = _shared_groups(flat.tensors)
    if shared:
        extra["__shared__"] = shared
    tensors = _CheckpointTensors(path, fileno, flat.tensors)
    return ModelFile(path=path, format="pickle", infos=infos, metadata=flat.metadata, extra=extra,
                     size_bytes=size, _loader=tensors.load, _closer=tensors.close)


# ---- whole objects with real tensors (training states) ---------------------------------

_MAX_OBJECT_DEPTH = 100
_MAX_OBJECT_NODES = 2_000_000  # counting a shared container once per place it occurs
_OPEN = object()


class _Materializer:
    """Rebuilds an unpickled object with in-memory copies of its tensors.

    Shared containers stay shared (built once), cycles and tensors inside keys or sets are
    refused, and depth and unfolded size are bounded: a consumer may print or compare the
    result. Copies are counted against the file's size as they are made.
    """

    def __init__(self, path: Path, tensors: _CheckpointTensors, file_size: int) -> None:
        self.path, self.tensors, self.file_size = path, tensors, file_size
        self.built: dict[int, Any] = {}  # id of a placeholder or container -> (result, nodes)
        self.claimed = 0

    def __call__(self, value: Any, depth: int = 0, in_key: bool = False) -> tuple[Any, int]:
        """(value with real tensors, its node count unfolded)."""
        if not isinstance(value, (PickledTensor, dict, list, tuple, set, frozenset)):
            return value, 1
        if in_key and isinstance(value, PickledTensor):
            raise _invalid(self.path, "a tensor is used as a dict key or set member")
        known = self.built.get(id(value))
        if known is _OPEN:
            raise _invalid(self.path, "a container contains itself")
        if known is not None:
            return known
        if depth > _MAX_OBJECT_DEPTH:
            raise _invalid(self.path, f"containers nested deeper than {_MAX_OBJECT_DEPTH} levels")
        self.built[id(value)] = _OPEN
        result = self._tensor(value) if isinstance(value, PickledTensor) else \
            self._container(value, depth, in_key)
        self.built[id(value)] = result
        return result

    def _tensor(self, placeholder: PickledTensor) -> tuple[Any, int]:
        self.claimed += placeholder.nbytes
        check_claims(self.path, self.claimed, self.file_size)
        return self.tensors.view(placeholder, "(unnamed)").clone(), 1

    def _container(self, value: Any, depth: int, in_key: bool) -> tuple[Any, int]:
        nodes = 1

        def rebuilt(item: Any, key: bool) -> Any:
            nonlocal nodes
            result, inner = self(item, depth + 1, key)
            nodes += inner
            if nodes > _MAX_OBJECT_NODES:
                raise _invalid(self.path, f"more than {_MAX_OBJECT_NODES:,} objects once shared "
                                          "containers are counted where each occurs")
            return result

        if isinstance(value, dict):
            pairs = [(rebuilt(key, True), rebuilt(item, in_key)) for key, item in value.items()]
            return (OrderedDict(pairs) if isinstance(value, OrderedDict) else dict(pairs)), nodes
        in_set = in_key or isinstance(value, (set, frozenset))
        return type(value)(rebuilt(item, in_set) for item in value), nodes


def load_torch_object(path: Path) -> Any:
    """The object a torch.save file holds, read without running any pickled code, with
    its tensors copied into memory: for small files such as training states. Holds only
    tensors, numbers, strings, None and plain containers (dict, OrderedDict, list, tuple,
    set, frozenset, slice, complex, bytes); SdkitError for anything else."""
    fileno = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    tensors = _CheckpointTensors(path, fileno, {})
    try:
        with os.fdopen(os.dup(fileno), "rb") as file:
            obj = _read_object(path, file)
        return _Materializer(path, tensors, os.fstat(fileno).st_size)(obj)[0]
    finally:
        tensors.close()
