"""Valid-looking but hostile safetensors headers: each is refused with its limit named,
in seconds and a bounded amount of memory, or (at the limit) read just as quickly.

Each file is opened in a fresh interpreter that reports its own wall time and peak RSS,
so the numbers are those of one `open_model` (what every command does first). Before
these limits, a million empty tensors took ~40 s and 1 GB, and 100 MB of empty objects
2.5 GB, before anything was said.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from sdkit.errors import SdkitError
from sdkit.io import open_model

MB = 1_000_000
TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "sd1" / "toy-sd1.safetensors"
SECONDS = 15  # generous for a loaded 2-core machine; the slowest class takes ~2 s alone
PEAK_MIB = 450  # the header itself may take 100 MB; the old parser took 1-2.5 GB

# VmHWM is this process's own peak: ru_maxrss would carry over the parent's (pytest's)
# peak through fork and exec
_MEASURE = """
import json, resource, sys, time
def peak_mib():
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
from sdkit.errors import SdkitError
from sdkit.io import open_model
try:
    with open_model(sys.argv[1]) as model:
        outcome = f"accepted {len(model)} tensors, {len(model.metadata)} metadata keys"
except SdkitError as exc:
    outcome = str(exc)
print(json.dumps({"seconds": time.perf_counter() - start, "outcome": outcome,
                  "peak_mib": peak_mib()}))
"""


def frame(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def empty_tensor(name: bytes) -> bytes:
    return b'"' + name + b'":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'


def many_empty_tensors(count: int) -> bytes:
    return b"{" + b",".join(empty_tensor(b"t%d" % i) for i in range(count)) + b"}"


def many_spaced_tensors(count: int) -> bytes:
    """The same, spelled the way json.dumps spells it and with the keys reordered."""
    entries = (b'"t%d": {"shape": [0], "dtype": "F32", "data_offsets": [0, 0]}' % i
               for i in range(count))
    return b"{" + b", ".join(entries) + b"}"


def many_metadata_keys(count: int) -> bytes:
    return b'{"__metadata__":{' + b",".join(b'"k%d":"v"' % i for i in range(count)) + b"}}"


def repeated(item: bytes, total: int) -> bytes:
    """`item,item,…` of about `total` bytes, built without a list of parts."""
    return (item + b",") * (total // (len(item) + 1)) + item


TENSOR = b'"dtype":"F32","shape":[0],"data_offsets":[0,0]'
HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "a million empty tensors (59 MB)": (
        lambda: many_empty_tensors(1_000_000), "more than 50000 tensors"),
    "a million empty tensors, spelled loosely (67 MB)": (
        lambda: many_spaced_tensors(1_000_000), "more than 50000 tensors"),
    "a million metadata keys (14 MB)": (
        lambda: many_metadata_keys(1_000_000), "more than 50000 keys"),
    "a 50 MB tensor name": (
        lambda: b"{" + empty_tensor(b"n" * (50 * MB)) + b"}", "over the limit of 4096"),
    "a 50 MB metadata key": (
        lambda: b'{"__metadata__":{"' + b"k" * (50 * MB) + b'":"v"}}', "over the limit of 4096"),
    "100 MB of empty objects as entries": (
        lambda: b"{" + repeated(b'"":{}', 99 * MB) + b"}", "unknown dtype"),
    "100 MB of empty objects in an extra field": (
        lambda: b'{"a":{' + TENSOR + b',"x":[' + repeated(b"{}", 99 * MB) + b"]}}",
        "'x' holds an array"),
    "100 MB of empty objects as a shape": (
        lambda: b'{"a":{"dtype":"F32","shape":[' + repeated(b"{}", 99 * MB) + b'],'
                b'"data_offsets":[0,0]}}', "shape holds a nested value"),
    "100 MB of empty arrays as a metadata value": (
        lambda: b'{"__metadata__":{"k":[' + repeated(b"[]", 99 * MB) + b"]}}", "is an array"),
    "100 MB of nested arrays in an extra field": (
        lambda: b'{"a":{' + TENSOR + b',"x":' + b"[" * (50 * MB) + b"]" * (49 * MB) + b"}}",
        "'x' holds an array"),
    "a shape of 50 million zeros": (
        lambda: b'{"a":{"dtype":"F32","shape":[' + repeated(b"0", 99 * MB) + b'],'
                b'"data_offsets":[0,0]}}', "more than 64"),
}


def measure(path: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True,
                            text=True, timeout=120, check=True)
    return json.loads(result.stdout)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_header_refused_fast_and_frugally(tmp_path: Path, case: str) -> None:
    build, limit = HOSTILE[case]
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(frame(build()))
    report = measure(path)
    assert "not a valid safetensors file" in report["outcome"] and limit in report["outcome"]
    assert report["outcome"].count("\n") == 0 and len(report["outcome"]) < 400
    assert report["seconds"] < SECONDS, report
    assert report["peak_mib"] < PEAK_MIB, report


@pytest.mark.parametrize("case,header,outcome", [
    ("50 000 empty tensors", lambda: many_empty_tensors(50_000), "accepted 50000 tensors"),
    ("50 000 loosely spelled", lambda: many_spaced_tensors(50_000), "accepted 50000 tensors"),
    ("50 000 metadata keys", lambda: many_metadata_keys(50_000), "50000 metadata keys"),
    ("a 45 MB metadata value of escapes", lambda: b'{"__metadata__":{"k":"' + b'\\"a' * 15_000_000
     + b'"}}', "1 metadata keys"),
])
def test_headers_at_the_limits_are_read_fast(tmp_path: Path, case: str, header, outcome: str) -> None:
    path = tmp_path / "edge.safetensors"
    path.write_bytes(frame(header()))
    report = measure(path)
    assert report["outcome"].startswith("accepted") and outcome in report["outcome"]
    assert report["seconds"] < SECONDS, report
    assert report["peak_mib"] < PEAK_MIB, report


def write_header(tmp_path: Path, header: dict, data: bytes = b"") -> Path:
    path = tmp_path / "case.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("shape", [
    [2**63, 0], [0, 2**63], [2**64 - 1, 0], [2**62, 2, 0], [2**62, 0, 4], [2**32, 2**31, 0, 1],
])
def test_shapes_torch_cannot_count_are_refused(tmp_path: Path, shape: list[int]) -> None:
    # no bytes, so the layout check alone would pass them (torch.empty(0).reshape fails)
    path = write_header(tmp_path, {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    with pytest.raises(SdkitError, match="2\\*\\*63") as error:
        open_model(path)
    assert "not a valid safetensors file" in str(error.value)


@pytest.mark.parametrize("shape", [[2**63 - 1, 0], [0, 2**63 - 1], [2**31, 2**31, 0], [1] * 64, []])
def test_largest_shapes_torch_can_count_load(tmp_path: Path, shape: list[int]) -> None:
    numel = 1
    for dim in shape:
        numel *= dim
    path = write_header(tmp_path, {"a": {"dtype": "F32", "shape": shape,
                                         "data_offsets": [0, 4 * numel]}}, b"\0" * (4 * numel))
    with open_model(path) as model:
        assert model.load("a").shape == torch.Size(shape)


@pytest.mark.parametrize("header,message", [
    ({"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, "has 65 items, more than 64"),
    ({"n" * 4097: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, "4097 bytes long"),
    ({"__metadata__": {"k" * 4097: "v"}}, "4097 bytes long"),
    ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": {}}}, "'x' holds an object"),
])
def test_limits_just_past_the_edge_are_named(tmp_path: Path, header: dict, message: str) -> None:
    data = b"\0" * 4 if header.get("a", {}).get("data_offsets") == [0, 4] else b""
    with pytest.raises(SdkitError, match="not a valid safetensors file") as error:
        open_model(write_header(tmp_path, header, data))
    assert message in str(error.value)


def test_names_and_values_at_the_edge_are_read(tmp_path: Path) -> None:
    name, key, value = "n" * 4096, "k" * 4096, "v" * (5 * MB)  # kohya values reach MBs
    header = {"__metadata__": {key: value}, name: {"dtype": "F32", "shape": [0],
                                                   "data_offsets": [0, 0], "note": 1.5}}
    with open_model(write_header(tmp_path, header)) as model:
        assert model.keys() == [name] and model.metadata == {key: value}


def commands(bad: Path, out: Path) -> dict[str, list[str]]:
    """Every command that reads a model or adapter file, with `bad` as that file."""
    return {
        "inspect": ["inspect", str(bad)],
        "inspect --json": ["inspect", "--json", str(bad)],
        "convert": ["convert", str(bad), "-o", str(out)],
        "merge": ["merge", str(TOY), str(bad), "-o", str(out)],
        "lora check": ["lora", "check", str(TOY), str(bad)],
        "lora bake": ["lora", "bake", str(TOY), str(bad), "-o", str(out)],
        "lora merge": ["lora", "merge", str(bad), "-o", str(out)],
        "lora resize": ["lora", "resize", str(bad), "-o", str(out)],
        "embed inspect": ["embed", "inspect", str(bad)],
        "hypernet inspect": ["hypernet", "inspect", str(bad)],
        "vae swap": ["vae", "swap", str(TOY), str(bad), "-o", str(out)],
    }


BAD_FILES = {
    "a dimension of 2**63": {"a": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]}},
    "dimensions multiplying past 2**63": {
        "lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [2**40, 2**40, 0],
                                         "data_offsets": [0, 0]}},
    "a name past the limit": {"n" * 5000: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}},
}


@pytest.mark.parametrize("bad_file", list(BAD_FILES))
def test_every_reading_command_refuses_in_one_line(tmp_path: Path, bad_file: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from sdkit.cli.main import main

    bad = write_header(tmp_path, BAD_FILES[bad_file])
    before = bad.read_bytes()
    out = tmp_path / "out.safetensors"
    for name, argv in commands(bad, out).items():
        with pytest.raises(SystemExit) as exit_info:
            main(["--quiet", *argv])
        error = capsys.readouterr().err
        assert exit_info.value.code == 1, name
        assert error.startswith("sdkit: error: ") and error.count("\n") == 1, (name, error)
        assert "not a valid safetensors file" in error, (name, error)  # the header's refusal
        assert not out.exists(), name
    assert bad.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]


# ---- JSON inside metadata values -------------------------------------------------------

def test_metadata_json_parses_real_values_and_refuses_huge_ones() -> None:
    from sdkit.io.safetensors_json import metadata_json

    tags = {"folder": {f"tag {i}": i for i in range(200_000)}}  # a big kohya dataset
    assert metadata_json(json.dumps(tags)) == tags
    assert metadata_json('{"algo": "lokr"}') == {"algo": "lokr"}
    for hostile in ("[" + ",".join(["[]"] * 2_000_000) + "]", "[" * 1_000_000 + "]" * 1_000_000,
                    '{"a":' * 100_000 + "1" + "}" * 100_000, "not json", ""):
        assert metadata_json(hostile) is None


_COMMANDS = """
import contextlib, io, json, sys, time
from sdkit.cli.main import main
report = []
for argv in json.loads(sys.argv[1]):
    start, errors = time.perf_counter(), io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(["--quiet", *argv])
            code = 0
        except SystemExit as exc:
            code = exc.code
    report.append({"argv": argv, "code": code, "stderr": errors.getvalue(),
                   "seconds": time.perf_counter() - start})
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
print(json.dumps({"commands": report, "peak_mib": peak}))
"""


def test_huge_json_in_metadata_values_stays_bounded(tmp_path: Path) -> None:
    """45 MB of `[],[],…` in each metadata value sdkit parses as JSON: the old reader built
    15 million lists (over 1 GB) in inspect, lora check and merge."""
    from safetensors.torch import load_file, save_file

    value = "[" + ",".join(["[]"] * 15_000_000) + "]"
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    lora = {f"{module}.lora_up.weight": torch.zeros(32, 2), f"{module}.lora_down.weight": torch.zeros(2, 32)}
    for key in ("ss_tag_frequency", "ss_network_args", "lora_adapter_metadata"):
        save_file(lora, str(tmp_path / f"{key}.safetensors"),
                  metadata={key: value, "ss_network_module": "networks.lora"})
    save_file(load_file(str(TOY)), str(tmp_path / "merged-before.safetensors"),
              metadata={"sd_merge_models": value})
    del value
    commands = [["inspect", str(tmp_path / "ss_tag_frequency.safetensors")],
                ["inspect", str(tmp_path / "ss_network_args.safetensors")],
                ["lora", "check", str(TOY), str(tmp_path / "lora_adapter_metadata.safetensors")],
                ["merge", str(TOY), str(tmp_path / "merged-before.safetensors"), "-o",
                 str(tmp_path / "out.safetensors")]]
    result = subprocess.run([sys.executable, "-c", _COMMANDS, json.dumps(commands)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert all(run["code"] == 0 for run in report["commands"]), report["commands"]
    assert all(run["seconds"] < SECONDS for run in report["commands"]), report["commands"]
    assert report["peak_mib"] < 500, report["peak_mib"]


def test_human_inspect_shows_the_first_metadata_keys(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """50 000 keys (the limit) took rich minutes to lay out; --json still has them all."""
    import time

    from sdkit.cli.main import main

    path = tmp_path / "keys.safetensors"
    path.write_bytes(frame(many_metadata_keys(50_000)))
    start = time.perf_counter()
    main(["inspect", str(path)])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    shown = [line for line in out.splitlines() if line.startswith("│ k") and "kind" not in line]
    assert len(shown) == 200 and "and 49,800 more keys (all with --json)" in out
    assert shown[0].split()[1] == "k0"  # sorted: k0, k1, k10, k100, …
    assert elapsed < SECONDS
    main(["inspect", "--json", str(path)])
    assert len(json.loads(capsys.readouterr().out)["metadata"]) == 50_000

