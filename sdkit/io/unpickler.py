"""A pickle reader that can rebuild tensors and plain containers, and nothing else.

`pickle` runs code: any global it names can be called with arguments from the file.
`RestrictedUnpickler.find_class` therefore hands out only our own harmless callables
(placeholders for tensors and storages, validating constructors for a few builtins);
every other global is refused before anything is called. Tensors come back as
`PickledTensor` placeholders (storage, dtype, offset, shape, stride) so that reading a
checkpoint's structure needs neither torch nor the tensor bytes.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

from sdkit.errors import SdkitError, with_article
from sdkit.io.model_file import DTYPE_BITS

# torch storage class name -> dtype code of its elements
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "F32", "DoubleStorage": "F64", "HalfStorage": "F16",
    "BFloat16Storage": "BF16", "LongStorage": "I64", "IntStorage": "I32",
    "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8", "BoolStorage": "BOOL",
    "ComplexFloatStorage": "C64", "UntypedStorage": "U8",
}
_STORAGE_MODULES = ("torch", "torch.cuda", "torch.storage")


class _Invalid(Exception):
    """Raised by our constructors on arguments no genuine checkpoint contains."""


class _Sealed:
    """Refuses the pickle BUILD opcode, which could otherwise overwrite validated fields."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise _Invalid(f"pickle tries to modify {with_article(type(self).__name__)}")


class StorageRef(_Sealed):
    """One storage of a checkpoint: `nbytes` bytes at `file_offset` in the file.

    The archive readers set `file_offset` once they know it (for legacy files, after the
    object itself has been unpickled).
    """

    __slots__ = ("key", "dtype", "nbytes", "file_offset")

    def __init__(self, key: str, dtype: str, nbytes: int) -> None:
        self.key = key
        self.dtype = dtype
        self.nbytes = nbytes
        self.file_offset = 0


class PickledTensor(_Sealed):
    """A tensor as the pickle describes it: a strided view of a storage."""

    __slots__ = ("storage", "dtype", "offset", "shape", "stride")

    def __init__(self, storage: StorageRef, dtype: str, offset: int, shape: tuple[int, ...],
                 stride: tuple[int, ...]) -> None:
        self.storage = storage
        self.dtype = dtype
        self.offset = offset
        self.shape = shape
        self.stride = stride

    def view_key(self) -> tuple[Any, ...]:
        """Equal for two placeholders that are the very same view of the same bytes."""
        return (self.storage.key, self.dtype, self.offset, self.shape, self.stride)


@dataclass(frozen=True)
class _StorageType:
    """What `torch.FloatStorage` & co. resolve to: just the element dtype."""

    dtype: str


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise _Invalid(f"{what} is not a tuple of integers")
    return tuple(value)


def _check_extent(storage: StorageRef, dtype: str, offset: int, shape: tuple[int, ...],
                  stride: tuple[int, ...]) -> None:
    if len(stride) != len(shape) or offset < 0 or min(shape + stride, default=0) < 0:
        raise _Invalid(f"tensor view {list(shape)} / {list(stride)} @ {offset} is malformed")
    if 0 in shape:
        return
    last = offset + sum((size - 1) * step for size, step in zip(shape, stride))
    if (last + 1) * DTYPE_BITS[dtype] > storage.nbytes * 8:
        raise _Invalid(f"tensor view {list(shape)} @ {offset} reaches past the end of "
                       f"storage {storage.key!r} ({storage.nbytes} bytes)")


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None = None
            ) -> PickledTensor:
    if not isinstance(storage, StorageRef):
        raise _Invalid("tensor is not backed by a storage of the file")
    if type(offset) is not int:
        raise _Invalid("tensor storage offset is not an integer")
    shape, steps = _int_tuple(size, "tensor size"), _int_tuple(stride, "tensor stride")
    dtype = dtype or storage.dtype
    _check_extent(storage, dtype, offset, shape, steps)
    return PickledTensor(storage, dtype, offset, shape, steps)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> PickledTensor:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> PickledTensor:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> PickledTensor:
    from sdkit.io.dtypes import TORCH_TO_CODE  # a dtype argument means torch is loaded already

    code = TORCH_TO_CODE.get(dtype)
    if code is None:
        raise _Invalid(f"tensor dtype {dtype!r} is not supported")
    return _tensor(storage, offset, size, stride, code)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any,
                       state: Any = None) -> PickledTensor:
    if not isinstance(data, PickledTensor):
        raise _Invalid("parameter does not wrap a tensor")
    return data


def _size(dims: Any = ()) -> tuple[int, ...]:
    return _int_tuple(dims, "torch.Size")


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    # protocol-2 pickles spell a bytes object as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Invalid("_codecs.encode is only allowed for latin1 text")
    return text.encode("latin-1")


# names under which pickle stores the torch dtypes we support (`torch.float16` -> "float16")
_TORCH_DTYPE_NAMES = frozenset({
    "bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex64", "float8_e4m3fn", "float8_e5m2",
    "float8_e4m3fnuz", "float8_e5m2fnuz",
})


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _size,
    ("_codecs", "encode"): _latin1_bytes,
    **{("builtins", name): getattr(builtins, name)
       for name in ("set", "frozenset", "slice", "complex")},
}


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Python 2 spellings in protocol-2 pickles (`__builtin__.set`) -> Python 3 names."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _printable(text: str) -> str:
    # names come from the file: keep the error on one readable line whatever they hold
    text = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 200 else text[:200] + "..."


# protocol-5 out-of-band buffers and bytearrays: never in checkpoints, and BYTEARRAY8
# allocates its declared size before reading anything
_REFUSED_OPCODES = frozenset(op[0] for op in (pickle.BYTEARRAY8, pickle.NEXT_BUFFER,
                                              pickle.READONLY_BUFFER))


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """Unpickles containers and tensor placeholders; any other global is refused.

    Built on the pure-Python unpickler: its memo is a dict, whereas the C one sizes an
    array by the largest memo index, so a 20-byte file could demand gigabytes. (Speed
    is the same here: the work is in our tensor callbacks.)
    `resolve_storage(key, dtype_code, nbytes)` turns a persistent id into a StorageRef.
    """

    dispatch = {op: load  # type: ignore[attr-defined]
                for op, load in pickle._Unpickler.dispatch.items()
                if op not in _REFUSED_OPCODES}

    def __init__(self, file: Any, path: Path,
                 resolve_storage: Callable[[str, str, int], StorageRef]) -> None:
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._resolve_storage = resolve_storage

    def find_class(self, module: str, name: str) -> Any:
        module, name = _python3_name(module, name)
        found = _ALLOWED.get((module, name))
        if found is None and module in _STORAGE_MODULES and name in STORAGE_DTYPES:
            found = _StorageType(STORAGE_DTYPES[name])
        if found is None and module == "torch" and name in _TORCH_DTYPE_NAMES:
            found = _torch_dtype(name)
        if found is None:
            raise SdkitError(f"{self._path}: refused pickle: forbidden global "
                             f"'{_printable(f'{module}.{name}')}'")
        return found

    def persistent_load(self, pid: Any) -> StorageRef:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise _Invalid(f"unsupported persistent id {str(pid)[:80]}")
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise _Invalid("storage views of very old PyTorch versions are not supported")
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) \
                or type(numel) is not int or numel < 0:
            raise _Invalid(f"malformed storage reference {str(pid)[:80]}")
        nbytes = numel * DTYPE_BITS[storage_type.dtype] // 8
        return self._resolve_storage(key, storage_type.dtype, nbytes)


class _BoundedReader:
    """The file as the unpickler sees it: no read asks for more bytes than remain.

    A corrupt length field (say 4 GB for a string) would otherwise make the file object
    allocate that much before finding out the data is not there.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        position = file.tell()
        self._size = file.seek(0, io.SEEK_END)
        file.seek(position)

    def _remaining(self, wanted: int) -> int:
        left = max(0, self._size - self._file.tell())
        return left if wanted < 0 else min(wanted, left)

    def read(self, size: int = -1) -> bytes:
        return self._file.read(self._remaining(size))

    def readline(self, size: int = -1) -> bytes:
        return self._file.readline(self._remaining(size))

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        return self._file.readinto(view[: self._remaining(len(view))])  # type: ignore[attr-defined]


def restricted_load(file: IO[bytes], path: Path,
                    resolve_storage: Callable[[str, str, int], StorageRef]) -> Any:
    """Unpickle one object; SdkitError for forbidden globals and for any malformed data."""
    try:
        return RestrictedUnpickler(_BoundedReader(file), path, resolve_storage).load()
    except SdkitError:
        raise
    except _Invalid as exc:
        raise SdkitError(f"{path}: not a valid checkpoint: {exc}") from None
    except RecursionError:
        raise SdkitError(f"{path}: not a valid checkpoint: pickle is nested too deeply") from None
    except Exception as exc:  # truncated or garbled pickle: any of a dozen exception types
        raise SdkitError(f"{path}: not a valid checkpoint: corrupt pickle data "
                         f"({exc.__class__.__name__}: {str(exc)[:120]})") from None
