"""Hostile torch files built by hand: pickles that nest, amplify, alias or mutate.

Each hostile object is a `Raw` piece of pickle code that leaves exactly one object on the
stack; `torch_file` puts it inside an otherwise genuine `torch.save` checkpoint (a real
tensor beside it), in the zip or the legacy layout and with pickle protocol 2 or 4, then
stores data.pkl deflated as a zip may, so that a kilobyte file can expand a lot. Memo
indices used by the pieces start at 10**6, clear of the pickler's own.
"""

from __future__ import annotations

import io
import pickle
import struct
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

MEMO_BASE = 10**6
LAYOUTS = {"zip-p2": (True, 2), "zip-p4": (True, 4), "legacy-p2": (False, 2), "legacy-p4": (False, 4)}


class Raw:
    """Pickle code written verbatim in place of an object."""

    def __init__(self, code: bytes) -> None:
        self.code = code


class _RawPickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_raw(self, raw: Raw) -> None:
        self.framer.commit_frame(force=True)  # the piece may be larger than a frame
        self.write(raw.code)

    dispatch[Raw] = save_raw


RAW_PICKLE = types.ModuleType("raw_pickle")
RAW_PICKLE.Pickler = _RawPickler  # type: ignore[attr-defined]
RAW_PICKLE.dump = lambda obj, file, protocol: _RawPickler(file, protocol).dump(obj)  # type: ignore[attr-defined]


# ---- opcode helpers ---------------------------------------------------------------------

def glob(module: str, name: str) -> bytes:
    """A global spelled with GLOBAL (valid in every protocol)."""
    return b"c" + f"{module}\n{name}\n".encode()


def text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def integer(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"\x8b" + struct.pack("<I", len(data)) + data  # LONG4


def put(index: int) -> bytes:
    return b"r" + struct.pack("<I", MEMO_BASE + index)  # LONG_BINPUT


def get(index: int) -> bytes:
    return b"j" + struct.pack("<I", MEMO_BASE + index)  # LONG_BINGET


def int_tuple(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(integer(v) for v in values) + b"t"


def storage_ref(key: str, numel: int, storage: str = "FloatStorage") -> bytes:
    """The persistent id torch writes for a storage (BINPERSID)."""
    return b"(" + text("storage") + glob("torch", storage) + text(key) + text("cpu") + integer(numel) + b"tQ"


def tensor_call(storage: bytes, offset: int, shape: tuple[int, ...] | bytes,
                stride: tuple[int, ...] | bytes) -> bytes:
    """_rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict()); shape and
    stride given as integers or as pickle code."""
    hooks = glob("collections", "OrderedDict") + b")R"
    shape_code = shape if isinstance(shape, bytes) else int_tuple(shape)
    stride_code = stride if isinstance(stride, bytes) else int_tuple(stride)
    return glob("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + integer(offset) \
        + shape_code + stride_code + b"\x89" + hooks + b"tR"


# ---- files -------------------------------------------------------------------------------

def torch_file(path: Path, hostile: Any, layout: str = "zip-p2", deflate: bool = True) -> Path:
    """A genuine checkpoint holding `hostile` beside a real tensor."""
    zipped, protocol = LAYOUTS[layout]
    checkpoint = {"state_dict": {"w": torch.ones(2)}, "hostile": hostile}
    torch.save(checkpoint, path, pickle_module=RAW_PICKLE, pickle_protocol=protocol,
               _use_new_zipfile_serialization=zipped)
    if zipped and deflate:
        with zipfile.ZipFile(path) as source:
            records = [(info.filename, source.read(info)) for info in source.infolist()]
        with zipfile.ZipFile(path, "w") as target:
            for name, data in records:
                method = zipfile.ZIP_DEFLATED if name.endswith("/data.pkl") else zipfile.ZIP_STORED
                target.writestr(name, data, compress_type=method, compresslevel=6)
    return path


def zip_file(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A torch zip archive around a data.pkl written by hand (deflated)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl, compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
        archive.writestr("archive/byteorder", b"little")
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def legacy_file(path: Path, object_pickle: bytes, storages: dict[str, bytes], padding: int = 0) -> Path:
    """The legacy torch.save layout around a pickle written by hand; `storages` in order,
    each given as its raw bytes of 4-byte elements (FloatStorage). `padding` no-op
    opcode pairs go after the PROTO opcode of each of the file's five pickles."""
    def padded(pickled: bytes) -> bytes:
        return pickled[:2] + b"N0" * padding + pickled[2:]

    head = b"".join(padded(pickle.dumps(value, protocol=2)) for value in (
        0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                       "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    tail = padded(pickle.dumps(list(storages), protocol=2))
    body = b"".join(struct.pack("<q", len(data) // 4) + data for data in storages.values())
    path.write_bytes(head + padded(object_pickle) + tail + body)
    return path


def state_dict_pickle(entries: dict[str, bytes], protocol: int = 2) -> bytes:
    """A pickle of {name: object} whose objects are given as pickle code."""
    items = b"".join(text(name) + code for name, code in entries.items())
    return b"\x80" + bytes([protocol]) + b"}(" + items + b"u."


# ---- hostile pieces ------------------------------------------------------------------------

DEEP = 1_000_000


def deep_tuple(levels: int = DEEP) -> bytes:
    return b")" + b"\x85" * levels  # EMPTY_TUPLE, then TUPLE1 over and over


def nesting(kind: str, levels: int = DEEP) -> Raw:
    """An object whose hashing (or printing) recurses `levels` deep."""
    pieces = {
        "tuple-key": b"}" + deep_tuple(levels) + b"Ns",
        "ordereddict-key": glob("collections", "OrderedDict") + b")R" + deep_tuple(levels) + b"Ns",
        "set": b"\x8f(" + deep_tuple(levels) + b"\x90",  # EMPTY_SET, ADDITEMS
        "frozenset": b"(" * levels + b"\x91" * levels,  # frozenset({frozenset({...})})
        "frozenset-call": glob("builtins", "frozenset") + b"](" + deep_tuple(levels) + b"e\x85R",
        "list": b"(" * levels + b"l" * levels,
        "slice": glob("builtins", "slice") + b"(" + deep_tuple(levels) + b"NNtR",
    }
    return Raw(pieces[kind])


NESTINGS = ("tuple-key", "ordereddict-key", "set", "frozenset", "frozenset-call", "list", "slice")


def shared_tuples(levels: int = 64) -> Raw:
    """t = (t, t) `levels` times, used as a dict key: 2**levels nodes to hash."""
    return Raw(b"}" + b")" + b"2\x86" * levels + b"Ns")  # DUP, TUPLE2


def shared_lists_filled_late(levels: int = 64) -> Raw:
    """Lists L0..Ln with L(k) = [L(k-1), L(k-1)], each filled before the list it holds,
    so that the unfolded size is only known once the whole object is there."""
    code = b"".join(b"]" + put(k) + b"0" for k in range(levels + 1))
    code += b"".join(get(k) + b"(" + get(k - 1) + get(k - 1) + b"e0" for k in range(levels, 0, -1))
    return Raw(code + get(levels))


def deep_lists_filled_late(levels: int = 200_000) -> Raw:
    """Lists L0..Ln with L(k) = [L(k+1)], each filled while the one it holds is still
    empty: nested `levels` deep, yet only ever one level deep when filled."""
    code = b"".join(b"]" + put(k) + b"0" for k in range(levels + 1))
    code += b"".join(get(k) + get(k + 1) + b"a0" for k in range(levels))
    return Raw(code + get(0))


def flood(kind: str, count: int) -> bytes:
    """A data.pkl of `count` cheap opcodes (a complete pickle)."""
    if kind == "dict-items":  # distinct keys
        return b"\x80\x04}(" + b"".join(b"J" + struct.pack("<i", i) + b"N" for i in range(count)) + b"u."
    repeated = {"no-op": b"N0", "memo": b"\x94", "empty-set": b"\x8f", "mark": b"(", "dup": b"2"}[kind]
    return b"\x80\x04N" + repeated * count + b"."
