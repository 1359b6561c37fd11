"""Pickle bombs: kilobyte files that nest a million levels deep, expand to millions of
opcodes, objects or memo entries, or claim gigabytes through views. Every reader refuses
each with one error line and exit 1 (never a crash: the commands run in child processes,
where a C-stack overflow shows as a signal), and the refusals are measured: time and
peak memory of the worst file of each class, in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from faults_cli import REPO, CliServer, Finished, assert_one_error_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "io"))  # the hostile pickle builders
from hostile_pickles import (DEEP, LAYOUTS, NESTINGS, deep_lists_filled_late, flood,  # noqa: E402
                             nesting, shared_lists_filled_late, shared_tuples, state_dict_pickle, storage_ref,
                             tensor_call, torch_file, zip_file)

NESTED = "nested more than 200 levels"
# kinds that push a MARK per level: the refusal comes once the marks are in, so fewer
# levels keep the test quick (the full million is in the budget test below)
LEVELS = {"frozenset": 20_000, "list": 20_000}
SECONDS = 20.0  # per refusal, on a loaded 2-core machine; about 1-3 s when idle
GROWTH_MIB = 400  # peak memory a refusal may add to the process


def refused_in_one_line(result: Finished, *mentions: str) -> None:
    line = assert_one_error_line(result, *mentions)
    assert "rerun with --debug" not in line and "weights_only" not in line, line


# each kind of nest in a zip and a legacy file, protocols 2 and 4 between them; the tuple
# key in all four layouts
NEST_LAYOUTS = {"tuple-key": tuple(LAYOUTS), "ordereddict-key": ("zip-p4", "legacy-p2"),
                "set": ("zip-p2", "legacy-p4"), "frozenset": ("zip-p4", "legacy-p2"),
                "frozenset-call": ("zip-p2", "legacy-p4"), "list": ("zip-p4", "legacy-p2"),
                "slice": ("zip-p2", "legacy-p4")}
NEST_CASES = [(kind, layout) for kind in NESTINGS for layout in NEST_LAYOUTS[kind]]


@pytest.fixture(scope="module")
def nests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("nests")
    return {f"{kind}-{layout}": torch_file(folder / f"{kind}-{layout}.pt", nesting(kind, LEVELS.get(kind, DEEP)),
                                           layout)
            for kind, layout in NEST_CASES}


@pytest.mark.parametrize("kind,layout", NEST_CASES)
def test_deep_nests_are_refused(cli: CliServer, nests: dict[str, Path], kind: str, layout: str,
                                tmp_path: Path) -> None:
    path = nests[f"{kind}-{layout}"]
    if layout.startswith("zip") and kind not in LEVELS:
        assert path.stat().st_size < 3000  # a million levels in a couple of kilobytes
    refused_in_one_line(cli.run("inspect", str(path)), str(path), NESTED)
    if kind == "tuple-key":
        output = tmp_path / "out.safetensors"
        refused_in_one_line(cli.run("convert", str(path), "-o", str(output)), NESTED)
        assert not output.exists()


def broadcast_view(path: Path) -> Path:
    """position_ids viewed as (1, 2**29) with stride 0 over one int64."""
    view = tensor_call(storage_ref("0", 1, "LongStorage"), 0, (1, 2**29), (0, 0))
    return zip_file(path, state_dict_pickle({"cond_stage_model.transformer.text_model.embeddings.position_ids": view}),
                    {"0": bytes(8)})


def aliases(path: Path, names: int = 2000, elements: int = 1 << 18) -> Path:
    """`names` names each viewing all of one 1 MiB storage."""
    whole = tensor_call(storage_ref("0", elements), 0, (elements,), (1,))
    return zip_file(path, state_dict_pickle({f"model.diffusion_model.w{i}": whole for i in range(names)}),
                    {"0": bytes(4 * elements)})


def worst_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """The worst file of each class, under 10 MB, and what its refusal must say."""
    operations = "pickle operations"
    return {
        "no-op opcodes": (zip_file(folder / "noop.pt", flood("no-op", 1_600_000)), operations),
        "memo entries": (zip_file(folder / "memo.pt", flood("memo", 1_100_000)), "memo entries"),
        "empty sets": (zip_file(folder / "sets.pt", flood("empty-set", 800_000)), operations),
        "marks": (zip_file(folder / "marks.pt", flood("mark", 1_600_000)), operations),
        "dict items": (zip_file(folder / "items.pt", flood("dict-items", 800_000)), operations),
        "80 MiB data.pkl": (zip_file(folder / "huge.pt", flood("no-op", 40 << 20)), "declares"),
        "a million nested frozensets": (torch_file(folder / "frozensets.pt", nesting("frozenset")), NESTED),
        "2**64 nodes of shared tuples": (torch_file(folder / "tuples.pt", shared_tuples()), "shared parts"),
        "2**64 nodes of lists filled late": (torch_file(folder / "lists.pt", shared_lists_filled_late()),
                                             "shared containers"),
        "200 000 nested lists filled late": (torch_file(folder / "deep-lists.pt", deep_lists_filled_late()),
                                             "nested deeper than 100 levels"),
        "broadcast view": (broadcast_view(folder / "broadcast.pt"), "claims 536870912 elements"),
        "2000 aliases of 1 MiB": (aliases(folder / "aliases.pt"), "more than 4 times the file"),
    }


def test_refusals_are_quick_and_small(tmp_path: Path) -> None:
    files = worst_files(tmp_path)
    assert all(path.stat().st_size < 10 << 20 for path, _ in files.values())
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    probe = subprocess.run([sys.executable, str(Path(__file__).with_name("refusal_probe.py")),
                            *(str(path) for path, _ in files.values())],
                           capture_output=True, text=True, env=environment, timeout=600)
    lines = [json.loads(line) for line in probe.stdout.splitlines()]
    assert probe.returncode == 0 and len(lines) == len(files), probe.stderr[-2000:]
    report = []
    for (name, (path, said)), line in zip(files.items(), lines):
        assert line["error"] is not None and said in line["error"], (name, line)
        assert line["error"].startswith(f"{path}: ") and "\n" not in line["error"], line
        report.append(f"{name}: {line['seconds']} s, +{line['grown_mib']} MiB")
    print("\n".join(report))
    assert all(line["seconds"] < SECONDS for line in lines), report
    assert max(line["grown_mib"] for line in lines) < GROWTH_MIB, report


BOMB_COMMANDS = {  # a bomb of each kind through one of the commands that read checkpoints
    "flood": (lambda folder: zip_file(folder / "flood.pt", flood("no-op", 1_600_000)), ["inspect", "BOMB"]),
    "aliases": (lambda folder: aliases(folder / "aliases.pt"), ["convert", "BOMB", "-o", "OUT"]),
    "broadcast": (lambda folder: broadcast_view(folder / "broadcast.pt"), ["embed", "inspect", "BOMB"]),
    "late lists": (lambda folder: torch_file(folder / "lists.pt", deep_lists_filled_late(1000)),
                   ["merge", "A", "BOMB", "-o", "OUT"]),
}


@pytest.mark.parametrize("case", sorted(BOMB_COMMANDS))
def test_bombs_through_the_commands(cli: CliServer, fault_inputs: dict[str, Path], tmp_path: Path,
                                    case: str) -> None:
    write, command = BOMB_COMMANDS[case]
    bomb, output = write(tmp_path), tmp_path / "out.safetensors"
    words = {"BOMB": str(bomb), "OUT": str(output), "A": str(fault_inputs["a"])}
    refused_in_one_line(cli.run(*(words.get(word, word) for word in command)), str(bomb), "not a valid checkpoint")
    assert not output.exists()


def test_library_scan_indexes_bombs_as_unknown(cli: CliServer, nests: dict[str, Path], tmp_path: Path) -> None:
    library = tmp_path / "library"
    assert cli.run("library", "init", str(library), "--layout", "comfyui").status == 0
    folder = library / "models" / "checkpoints"
    bombs = [nests["tuple-key-zip-p2"], nests["set-legacy-p4"], nests["ordereddict-key-zip-p4"]]
    for path in bombs:
        (folder / path.name).write_bytes(path.read_bytes())
    broadcast_view(folder / "broadcast.pt")
    scanned = cli.run("library", "scan", str(library))
    assert scanned.status == 0, scanned.stderr
    listed = cli.run("library", "ls", "--library", str(library), "--json")
    kinds = {Path(entry["path"]).name: entry["kind"] for entry in json.loads(listed.stdout)}
    assert kinds == {**{path.name: "unknown" for path in bombs}, "broadcast.pt": "unknown"}
