"""Hostile pickles through the Python API: views that claim more than their storage or
the file, integers and dimensions torch cannot hold, pickles that try to change sdkit's
own objects, and opcodes checkpoints never use. Each is refused with one SdkitError line
naming what is wrong; honest files built alongside keep loading like torch.load."""

from __future__ import annotations

import copyreg
import os
import pickle
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hostile_pickles import (get, glob, int_tuple, integer, legacy_file, put, shared_lists_filled_late,
                             state_dict_pickle, storage_ref, tensor_call, text, zip_file)

from sdkit.errors import SdkitError
from sdkit.io import open_model
from sdkit.io.dtypes import CODE_TO_TORCH
from sdkit.io.unpickler import TORCH_DTYPE_CODES


def refused(path: Path, *mentions: str) -> str:
    with pytest.raises(SdkitError) as error:
        open_model(path).close()
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(f"{path}: "), message
    for mention in mentions:
        assert mention in message, (mention, message)
    return message


def floats(count: int) -> bytes:
    return struct.pack(f"<{count}f", *range(count))


# ---- views -------------------------------------------------------------------------------

BAD_VIEWS = {  # name: (storage elements, offset, shape, stride, what the refusal says)
    "broadcast position ids": (1, 0, (1, 2**29), (0, 0), "claims 536870912 elements"),
    "stride 0 inside the storage": (8, 0, (8,), (0,), "stride 0"),
    "stride 0 on an inner dim": (8, 0, (2, 4), (4, 0), "stride 0"),
    "overlapping rows": (128, 0, (64, 64), (1, 1), "claims 4096 elements"),
    "size past int64 beside a zero": (4, 0, (0, 2**63), (1, 1), "does not fit in 64 bits"),
    "sizes whose product overflows": (4, 0, (0, 2**62, 4), (1, 1, 1), "does not fit in 64 bits"),
    "stride past int64": (4, 0, (1,), (2**64,), "does not fit in 64 bits"),
    "offset past int64": (4, 2**63, (0,), (1,), "does not fit in 64 bits"),
}


@pytest.mark.parametrize("case", sorted(BAD_VIEWS))
def test_views_claiming_more_than_their_storage_are_refused(tmp_path: Path, case: str) -> None:
    numel, offset, shape, stride, said = BAD_VIEWS[case]
    data_pkl = state_dict_pickle({"w": tensor_call(storage_ref("0", numel), offset, shape, stride)})
    refused(zip_file(tmp_path / "view.pt", data_pkl, {"0": floats(numel)}), "not a valid checkpoint", said)


def test_broadcast_position_ids_of_real_text_encoders_still_load(tmp_path: Path) -> None:
    # transformers registers position_ids as arange(77).expand((1, -1)), which older
    # torch versions saved with stride 0 on the dim of 1
    ids = torch.arange(77).as_strided((1, 77), (0, 1))
    path = tmp_path / "clip.pt"
    torch.save({"position_ids": ids, "w": torch.ones(3)}, path)
    with open_model(path) as model:
        assert torch.equal(model.load("position_ids"), torch.load(path, weights_only=True)["position_ids"])


def aliases(names: int, elements: int, shared_placeholder: bool) -> bytes:
    """`names` names viewing all of one storage: one memoized tensor, or a tensor each."""
    whole = tensor_call(storage_ref("0", elements), 0, (elements,), (1,))
    if shared_placeholder:
        entries = {"w0": whole + put(0), **{f"w{i}": get(0) for i in range(1, names)}}
    else:
        entries = {f"w{i}": whole for i in range(names)}
    return state_dict_pickle(entries)


@pytest.mark.parametrize("shared_placeholder", [True, False], ids=["one-view-memoized", "a-view-each"])
def test_many_names_aliasing_one_storage_are_refused(tmp_path: Path, shared_placeholder: bool) -> None:
    path = zip_file(tmp_path / "aliases.pt", aliases(20_000, 4096, shared_placeholder), {"0": floats(4096)})
    assert path.stat().st_size < 200_000  # 20 000 x 16 KiB claimed: 327 MB
    refused(path, "claim", "more than 4 times the file")


@pytest.mark.parametrize("shared_placeholder", [True, False], ids=["one-view-memoized", "a-view-each"])
def test_a_few_tied_names_keep_loading(tmp_path: Path, shared_placeholder: bool) -> None:
    values = floats(16384)  # 64 KiB: the file is mostly this storage
    path = zip_file(tmp_path / "tied.pt", aliases(4, 16384, shared_placeholder), {"0": values})
    with open_model(path) as model:
        assert model.extra["__shared__"] == [["w0", "w1", "w2", "w3"]]
        assert all(model.load(f"w{i}").tolist() == list(range(16384)) for i in range(4))


# ---- integers ------------------------------------------------------------------------------

BIG_INTEGERS = {  # name: pickle code of one huge integer
    "LONG4 positive": integer(2**20000),
    "LONG4 negative": integer(-(2**20000)),
    "INT in hex": b"I0x" + b"f" * 5000 + b"\n",
    "LONG in hex": b"L0x" + b"f" * 5000 + b"L\n",
}


@pytest.mark.parametrize("where", ["metadata", "nested", "dict key"])
@pytest.mark.parametrize("case", sorted(BIG_INTEGERS))
def test_integers_too_long_to_print_are_refused(tmp_path: Path, case: str, where: str) -> None:
    number = BIG_INTEGERS[case]
    value = {"metadata": number, "nested": b"]" + number + b"a", "dict key": b"}" + number + b"Ns"}[where]
    weight = tensor_call(storage_ref("0", 2), 0, (2,), (1,))
    path = zip_file(tmp_path / "int.pt", state_dict_pickle({"w": weight, "step": value}), {"0": floats(2)})
    refused(path, "an integer of", "bits")


@pytest.mark.parametrize("number", [b"L" + b"9" * 5000 + b"L\n", b"I" + b"9" * 5000 + b"\n",
                                    b"I12x\n", b"L-L\n"])
def test_integers_in_decimal_past_pythons_digit_limit_are_refused(tmp_path: Path, number: bytes) -> None:
    data_pkl = state_dict_pickle({"step": number})
    refused(zip_file(tmp_path / "int.pt", data_pkl), "an integer written in more digits")


def test_an_integer_at_the_limit_loads_and_prints(tmp_path: Path) -> None:
    weight = tensor_call(storage_ref("0", 2), 0, (2,), (1,))
    path = zip_file(tmp_path / "int.pt", state_dict_pickle({"w": weight, "step": integer(2**2047)}),
                    {"0": floats(2)})
    with open_model(path) as model:
        assert model.metadata["step"] == str(2**2047)


# ---- pickles that would change sdkit's objects for the rest of the process -------------

BUILD_TARGETS = [("torch", "Size"), ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"),
                 ("builtins", "set"), ("builtins", "frozenset"), ("torch", "float16"), ("torch", "FloatStorage"),
                 ("_codecs", "encode")]
STATES = {  # BUILD's argument: instance attributes, or (attributes, attributes set with setattr)
    "setattr __defaults__": b"N}" + text("__defaults__") + int_tuple((7, 7)) + b"\x85s\x86",
    "dict state": b"}" + text("extra") + integer(1) + b"s",
}


def honest_checkpoint(path: Path) -> Path:
    """Every allowed global at work: torch.Size() for a scalar, a v3 float16 tensor, an
    OrderedDict, a set, a frozenset and bytes."""
    scalar = tensor_call(storage_ref("0", 2), 1, glob("torch", "Size") + b")R", glob("torch", "Size") + b")R")
    half = glob("torch._utils", "_rebuild_tensor_v3") + b"(" + storage_ref("1", 4, "UntypedStorage") \
        + integer(0) + glob("torch", "Size") + int_tuple((2,)) + b"\x85R" + int_tuple((1,)) \
        + b"\x89" + glob("collections", "OrderedDict") + b")R" + glob("torch", "float16") + b"tR"
    entries = {"scalar": scalar, "half": half,
               "names": glob("collections", "OrderedDict") + b")R" + text("a") + integer(1) + b"s",
               "set": glob("builtins", "set") + b"((" + integer(1) + integer(2) + b"lt" + b"R",
               "frozen": glob("builtins", "frozenset") + b"((" + integer(3) + b"lt" + b"R",
               "raw": glob("_codecs", "encode") + b"(" + text("ab") + text("latin1") + b"tR"}
    return zip_file(path, state_dict_pickle(entries), {"0": floats(2), "1": struct.pack("<2e", 1.5, -2.0)})


def check_honest(path: Path) -> None:
    with open_model(path) as model:
        assert model.info("scalar").shape == () and model.load("scalar").item() == 1.0
        assert model.info("half").dtype == "F16" and model.load("half").tolist() == [1.5, -2.0]
        assert model.extra == {"names": OrderedDict(a=1), "set": {1, 2}, "frozen": frozenset({3}), "raw": b"ab"}


@pytest.mark.parametrize("state", sorted(STATES))
@pytest.mark.parametrize("target", BUILD_TARGETS, ids=".".join)
def test_build_on_a_handed_out_global_is_refused_and_changes_nothing(tmp_path: Path, target: tuple[str, str],
                                                                     state: str) -> None:
    honest = honest_checkpoint(tmp_path / "honest.pt")
    check_honest(honest)
    hostile = zip_file(tmp_path / "hostile.pt", state_dict_pickle({"x": glob(*target) + STATES[state] + b"b"}))
    refused(hostile, "attributes", "BUILD")
    check_honest(honest)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_module_state_dicts_with_their_metadata_attribute_load(tmp_path: Path, zip_format: bool) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    state = module.state_dict()
    assert hasattr(state, "_metadata")  # pickled with BUILD on the OrderedDict
    path = tmp_path / "module.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    with open_model(path) as model:
        assert model.keys() == list(state)
        assert all(torch.equal(model.load(name), tensor) for name, tensor in state.items())


def test_the_dtype_names_match_torch() -> None:
    assert {TORCH_DTYPE_CODES[str(dtype).removeprefix("torch.")]: dtype for dtype in CODE_TO_TORCH.values()} \
        == CODE_TO_TORCH


# ---- opcodes checkpoints never use -----------------------------------------------------

def test_extension_codes_are_refused_even_when_registered_and_cached(tmp_path: Path) -> None:
    # with os.system registered as an extension, any ordinary unpickling of it puts the
    # real function in copyreg's process-wide cache, where EXT4 would find it
    marker = tmp_path / "PWNED"
    code = 0x7FFF0001
    copyreg.add_extension(os.system.__module__, "system", code)
    try:
        assert pickle.loads(pickle.dumps(os.system, protocol=2)) is os.system
        assert copyreg._extension_cache[code] is os.system  # type: ignore[attr-defined]
        call = b"\x84" + struct.pack("<i", code) + b"(" + text(f"touch {marker}") + b"tR"  # EXT4
        refused(zip_file(tmp_path / "ext.pt", state_dict_pickle({"x": call})), "opcode EXT4")
    finally:
        copyreg.remove_extension(os.system.__module__, "system", code)
    assert not marker.exists()


@pytest.mark.parametrize("opcode", ["NEWOBJ", "INST", "OBJ"])
def test_class_instantiation_opcodes_are_refused(tmp_path: Path, opcode: str) -> None:
    code = {"NEWOBJ": glob("builtins", "set") + b")\x81", "INST": b"(ibuiltins\nset\n",
            "OBJ": b"(" + glob("builtins", "set") + b"o"}[opcode]
    refused(zip_file(tmp_path / "new.pt", state_dict_pickle({"x": code})), f"opcode {opcode}")


def test_a_huge_persistent_id_is_not_printed(tmp_path: Path) -> None:
    endless = shared_lists_filled_late(20).code  # a million nodes when printed
    refused(zip_file(tmp_path / "pid.pt", state_dict_pickle({"x": endless + b"Q"})), "persistent id (a list)")


# ---- names --------------------------------------------------------------------------------

def test_a_long_key_repeated_down_a_nest_is_refused(tmp_path: Path) -> None:
    # {"deep": {K: {K: ... {K: tensor}}}} with one 100 000-character K: 50 levels would
    # make names of up to 5 MB, 130 MB of them in all
    key, levels = "k" * 100_000, 50
    weight = tensor_call(storage_ref("0", 1), 0, (1,), (1,))
    nest = b"}" + text(key) + put(0) + b"".join(b"}" + get(0) for _ in range(levels - 1)) + weight + b"s" * levels
    path = zip_file(tmp_path / "names.pt", state_dict_pickle({"deep": nest}), {"0": floats(1)})
    refused(path, "a name longer than 4096 characters")


def test_a_shared_tree_of_a_quarter_million_names_is_refused(tmp_path: Path) -> None:
    # t = (t, t) 18 times over one empty tensor: 262 144 names claiming no bytes
    empty = tensor_call(storage_ref("0", 1), 0, (0,), (1,))
    tree = empty + b"\x85" + b"2\x86" * 18
    path = zip_file(tmp_path / "tree.pt", state_dict_pickle({"tree": tree}), {"0": floats(1)})
    assert path.stat().st_size < 3000
    refused(path, "more than 200,000 tensor and value names")


# ---- one budget per file ----------------------------------------------------------------------

@pytest.mark.parametrize("padding", [1000, 700_000], ids=["light", "heavy"])
def test_the_five_pickles_of_a_legacy_file_share_one_budget(tmp_path: Path, padding: int) -> None:
    # 5 x 1.4 million no-op opcodes: each pickle within the budget, the file far past it
    weight = tensor_call(storage_ref("0", 2), 0, (2,), (1,))
    path = legacy_file(tmp_path / "legacy.pt", state_dict_pickle({"w": weight}), {"0": floats(2)}, padding)
    if padding == 1000:
        with open_model(path) as model:
            assert model.load("w").tolist() == [0.0, 1.0]
    else:
        refused(path, "pickle operations")


LONG_MESSAGES = {  # what would make a long error message: (storage key, shape, stride)
    "a storage key of a million characters": ("k" * 1_000_000, (1,), (1,)),
    "a view of 100 000 dimensions": ("0", (1,) * 100_000, (1,) * 100_000),
    "a view of 600-digit sizes": ("0", (2**2000,) * 20, (1,) * 20),
}


@pytest.mark.parametrize("case", sorted(LONG_MESSAGES))
def test_error_messages_stay_short_whatever_the_file_holds(tmp_path: Path, case: str) -> None:
    key, shape, stride = LONG_MESSAGES[case]
    data_pkl = state_dict_pickle({"w": tensor_call(storage_ref(key, 1), 0, shape, stride)})
    refused(zip_file(tmp_path / "long.pt", data_pkl, {"0": floats(1)}), "not a valid checkpoint")
