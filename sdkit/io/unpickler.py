"""A pickle reader that can rebuild tensors and plain containers, and nothing else.

`pickle` runs code: any global it names can be called with arguments from the file.
`RestrictedUnpickler.find_class` therefore hands out only wrappers of our own harmless
callables (placeholders for tensors and storages, validating constructors for a few
builtins), never a real class or function the pickle could modify for the rest of the
process; every other global is refused before anything is called. Every opcode runs
under the budgets of `pickle_guard` (work, memo, nesting, integer size). Tensors come
back as `PickledTensor` placeholders (storage, dtype, offset, shape, stride) so that
reading a checkpoint's structure needs neither torch nor the tensor bytes.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import pickle
from pathlib import Path
from typing import IO, Any, Callable

from sdkit.errors import SdkitError, with_article
from sdkit.io.model_file import DTYPE_BITS
from sdkit.io.pickle_guard import PickleGuard, PickleLimit, guarded_dispatch

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


class StorageRef:
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


class PickledTensor:
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

    @property
    def nbytes(self) -> int:
        """Bytes this view spans when copied out (elements x element size)."""
        count = 1
        for size in self.shape:
            count *= size
        return count * DTYPE_BITS[self.dtype] // 8


class _HandedOut:
    """What find_class returns for an allowed global: a fresh object of our own, never the
    real class or function, so that no pickle can change what they do for the rest of the
    process (BUILD on it is refused, and it has no other attributes to set)."""

    __slots__ = ("global_name",)

    def __init__(self, global_name: str) -> None:
        self.global_name = global_name


class _Global(_HandedOut):
    """An allowed callable: calling it runs one of our own functions."""

    __slots__ = ("_function",)

    def __init__(self, global_name: str, function: Callable[..., Any]) -> None:
        super().__init__(global_name)
        self._function = function

    def __call__(self, *args: Any) -> Any:
        return self._function(*args)


class _StorageType(_HandedOut):
    """What `torch.FloatStorage` & co. resolve to: just the element dtype."""

    __slots__ = ("dtype",)

    def __init__(self, global_name: str, dtype: str) -> None:
        super().__init__(global_name)
        self.dtype = dtype


class _TorchDtype(_HandedOut):
    """What `torch.float16` & co. resolve to: the dtype's code ("F16")."""

    __slots__ = ("code",)

    def __init__(self, global_name: str, code: str) -> None:
        super().__init__(global_name)
        self.code = code


_MAX_DIM = 2**63  # torch holds sizes, strides and offsets as int64
_MAX_NDIM = 64  # real tensors have a handful


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise _Invalid(f"{what} is not a tuple of integers")
    return tuple(value)


def _view_text(shape: tuple[int, ...], stride: tuple[int, ...], offset: int) -> str:
    text = f"tensor view {list(shape)} / {list(stride)} @ {offset}"
    return text if len(text) <= 200 else text[:200] + "..."


def _check_view(storage: StorageRef, dtype: str, offset: int, shape: tuple[int, ...],
                stride: tuple[int, ...]) -> None:
    """A view torch can build that reads only its storage's bytes, each element once at
    most per view: so that the bytes a file's tensors claim stay bounded by its size."""
    if len(shape) > _MAX_NDIM:
        raise _Invalid(f"a tensor of {len(shape)} dimensions (sdkit's limit: {_MAX_NDIM})")
    if len(stride) != len(shape) or min((offset, *shape, *stride)) < 0:
        raise _Invalid(f"{_view_text(shape, stride, offset)} is malformed")
    count = 1
    for size in shape:
        count *= max(size, 1)
    if max((offset, count, *stride)) >= _MAX_DIM:
        raise _Invalid(f"{_view_text(shape, stride, offset)} does not fit in 64 bits")
    if 0 in shape:
        return
    capacity = storage.nbytes * 8 // DTYPE_BITS[dtype]
    if count > capacity:
        raise _Invalid(f"{_view_text(shape, stride, offset)} claims {count} elements; its storage "
                       f"{printable(storage.key)!r} holds {capacity}")
    if any(size > 1 and step == 0 for size, step in zip(shape, stride)):
        raise _Invalid(f"{_view_text(shape, stride, offset)} repeats elements of its storage (stride 0)")
    last = offset + sum((size - 1) * step for size, step in zip(shape, stride))
    if last >= capacity:
        raise _Invalid(f"tensor view {list(shape)} @ {offset} reaches past the end of "
                       f"storage {printable(storage.key)!r} ({storage.nbytes} bytes)")


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None = None
            ) -> PickledTensor:
    if not isinstance(storage, StorageRef):
        raise _Invalid("tensor is not backed by a storage of the file")
    if type(offset) is not int:
        raise _Invalid("tensor storage offset is not an integer")
    shape, steps = _int_tuple(size, "tensor size"), _int_tuple(stride, "tensor stride")
    dtype = dtype or storage.dtype
    _check_view(storage, dtype, offset, shape, steps)
    return PickledTensor(storage, dtype, offset, shape, steps)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> PickledTensor:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> PickledTensor:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> PickledTensor:
    if not isinstance(dtype, _TorchDtype):
        raise _Invalid("tensor dtype is not a supported torch dtype")
    return _tensor(storage, offset, size, stride, dtype.code)


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


# names under which pickle stores the torch dtypes we support (`torch.float16` ->
# "float16"), with their codes
TORCH_DTYPE_CODES: dict[str, str] = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
    "int32": "I32", "uint32": "U32", "int64": "I64", "uint64": "U64", "float16": "F16",
    "bfloat16": "BF16", "float32": "F32", "float64": "F64", "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}

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


# what a refusal tells instead of torch's advice to load the file with weights_only=False
_WHAT_LOADS = "sdkit loads tensors, plain containers, numbers and strings, and runs no pickled code"


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Python 2 spellings in protocol-2 pickles (`__builtin__.set`) -> Python 3 names."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def printable(text: str) -> str:
    # names come from the file: keep the error on one readable line whatever they hold
    text = text[:400]
    text = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 200 else text[:200] + "..."


def _described(value: Any) -> str:
    """A value from the file in an error message: never its repr, which a crafted object
    can make endless."""
    if isinstance(value, str):
        return repr(printable(value))
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return with_article(type(value).__name__)


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """Unpickles containers and tensor placeholders; any other global is refused.

    Built on the pure-Python unpickler: its memo is a dict, whereas the C one sizes an
    array by the largest memo index, so a 20-byte file could demand gigabytes; and its
    opcodes can be wrapped one by one (`pickle_guard`). Speed is the same here: the work
    is in our tensor callbacks.
    `resolve_storage(key, dtype_code, nbytes)` turns a persistent id into a StorageRef.
    """

    dispatch = guarded_dispatch(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: Any, path: Path, resolve_storage: Callable[[str, str, int], StorageRef],
                 guard: PickleGuard) -> None:
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._resolve_storage = resolve_storage
        self.guard = guard

    def find_class(self, module: str, name: str) -> Any:
        module, name = _python3_name(module, name)
        spelled = f"{module}.{name}"
        if (module, name) in _ALLOWED:
            return _Global(spelled, _ALLOWED[module, name])
        if module in _STORAGE_MODULES and name in STORAGE_DTYPES:
            return _StorageType(spelled, STORAGE_DTYPES[name])
        if module == "torch" and name in TORCH_DTYPE_CODES:
            return _TorchDtype(spelled, TORCH_DTYPE_CODES[name])
        raise SdkitError(f"{self._path}: refused pickle: forbidden global "
                         f"'{printable(spelled)}' ({_WHAT_LOADS})")

    def persistent_load(self, pid: Any) -> StorageRef:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise _Invalid(f"unsupported persistent id ({_described(pid)})")
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise _Invalid("storage views of very old PyTorch versions are not supported")
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) \
                or type(numel) is not int or numel < 0:
            raise _Invalid("malformed storage reference (type, key, location, element count)")
        nbytes = numel * DTYPE_BITS[storage_type.dtype] // 8
        return self._resolve_storage(key, storage_type.dtype, nbytes)
class _BoundedReader:
    """The file as the unpickler sees it: no read asks for more bytes than remain.

    A corrupt length field (say 4 GB for a string) would otherwise make the file object
    allocate that much before finding out the data is not there. The position is kept
    here (the unpickler reads nothing but through this object), which is cheaper than
    asking the file on every opcode.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._position = file.tell()
        self._size = file.seek(0, io.SEEK_END)
        file.seek(self._position)

    def _remaining(self, wanted: int) -> int:
        left = self._size - self._position
        return left if wanted < 0 or wanted > left else wanted

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(self._remaining(size))
        self._position += len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data = self._file.readline(self._remaining(size))
        self._position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = self._file.readinto(view[: self._remaining(len(view))])  # type: ignore[attr-defined]
        self._position += count
        return count


def restricted_load(file: IO[bytes], path: Path, resolve_storage: Callable[[str, str, int], StorageRef],
                    guard: PickleGuard | None = None) -> Any:
    """Unpickle one object; SdkitError for forbidden globals and for any malformed data.

    Pickles read one after another from one file (the legacy layout) share a `guard`:
    the budgets are the file's, not each pickle's."""
    # a BytesIO already returns no more than it holds
    source = file if isinstance(file, io.BytesIO) else _BoundedReader(file)
    try:
        return RestrictedUnpickler(source, path, resolve_storage, guard or PickleGuard()).load()
    except SdkitError:
        raise
    except (_Invalid, PickleLimit) as exc:
        raise SdkitError(f"{path}: not a valid checkpoint: {exc}") from None
    except RecursionError:
        raise SdkitError(f"{path}: not a valid checkpoint: pickle is nested too deeply") from None
    except Exception as exc:  # truncated or garbled pickle: any of a dozen exception types
        raise SdkitError(f"{path}: not a valid checkpoint: corrupt pickle data "
                         f"({exc.__class__.__name__}: {str(exc)[:120]})") from None
