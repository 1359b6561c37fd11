"""Evil pickles through every command that reads a pickle file: the code never runs (a
marker file it would create never appears), the command prints one error line, exits 1
and writes nothing.

Each payload is first shown to be live: PyTorch's unrestricted loader
(`torch.load(weights_only=False)`) does create the marker. Payloads sit deep inside a
real checkpoint object, in a zip-based and in a legacy torch file, with their globals
spelled by the GLOBAL opcode (protocol 2) and by STACK_GLOBAL (protocol 4).
"""

from __future__ import annotations

import io
import os
import pickle
import types
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from sdkit.cli.main import main


class Spelled:
    """A global given by module and name only: written as GLOBAL / STACK_GLOBAL opcodes
    without importing it (so `nt.system` can be written on Linux)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> None:  # the pickler wants a callable; never called
        raise NotImplementedError(f"{self.module}.{self.name} stands for a global")


class Call:
    """Pickles as a call of `function` with `args` (the REDUCE opcode)."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.function, self.args


class SpellingPickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """The pure-Python pickler, taught to write `Spelled` globals."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_spelled(self, spelled: Spelled) -> None:
        if self.proto >= 4:
            self.save(spelled.module)
            self.save(spelled.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{spelled.module}\n{spelled.name}\n".encode("ascii"))

    dispatch[Spelled] = save_spelled


SPELLING_PICKLE = types.ModuleType("spelling_pickle")
SPELLING_PICKLE.Pickler = SpellingPickler  # type: ignore[attr-defined]
SPELLING_PICKLE.dump = lambda obj, file, protocol: SpellingPickler(file, protocol).dump(obj)  # type: ignore[attr-defined]


def dumps(obj: Any, protocol: int) -> bytes:
    buffer = io.BytesIO()
    SpellingPickler(buffer, protocol).dump(obj)
    return buffer.getvalue()


def system(module: str, marker: Path) -> Call:
    return Call(Spelled(module, "system"), f"touch {marker}")


def evil_module(folder: Path, marker: Path) -> str:
    """A module that creates the marker when imported; returns its name."""
    name = f"sdkit_evil_{folder.name.replace('-', '_')}"
    (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return name


def payload(kind: str, marker: Path, folder: Path) -> Any:
    create = f"open({str(marker)!r}, 'w').close()"
    inner = folder / "inner.pkl"
    inner.write_bytes(dumps(system(os.name if os.name == "nt" else "posix", marker), protocol=2))
    payloads: dict[str, Callable[[], Any]] = {
        "builtins.eval": lambda: Call(Spelled("builtins", "eval"), create),
        "builtins.exec": lambda: Call(Spelled("builtins", "exec"), create),
        "os.system": lambda: system("os", marker),
        "posix.system": lambda: system("posix", marker),
        "nt.system": lambda: system("nt", marker),
        "subprocess.check_call": lambda: Call(Spelled("subprocess", "check_call"), ["touch", str(marker)]),
        "importlib.import_module": lambda: Call(Spelled("importlib", "import_module"),
                                                evil_module(folder, marker)),
        # torch.load(inner, None, pickle): an explicit pickle module turns weights_only off
        "torch.load": lambda: Call(Spelled("torch", "load"), str(inner), None,
                                   Call(Spelled("importlib", "import_module"), "pickle")),
        "runpy._run_code": lambda: Call(Spelled("runpy", "_run_code"), create, {}),
        "pickle.loads": lambda: Call(Spelled("pickle", "loads"), inner.read_bytes()),
    }
    return payloads[kind]()


KINDS = ["builtins.eval", "builtins.exec", "os.system", "posix.system", "nt.system", "subprocess.check_call",
         "importlib.import_module", "torch.load", "runpy._run_code", "pickle.loads"]
# (zip-based file?, pickle protocol): protocol 2 spells globals with GLOBAL, 4 with STACK_GLOBAL
CONTAINERS = {"zip-GLOBAL": (True, 2), "zip-STACK_GLOBAL": (True, 4),
              "legacy-GLOBAL": (False, 2), "legacy-STACK_GLOBAL": (False, 4)}


def evil_file(path: Path, evil: Any, container: str) -> Path:
    zipped, protocol = CONTAINERS[container]
    checkpoint = {"state_dict": {"w": torch.ones(2)}, "extra": {"deeper": [1, (evil,)]}}
    torch.save(checkpoint, path, pickle_module=SPELLING_PICKLE, pickle_protocol=protocol,
               _use_new_zipfile_serialization=zipped)
    return path


def readers(evil: Path, inputs: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """Every command that opens `evil`, in the role it reads it."""
    return {
        "inspect": ["inspect", str(evil)],
        "convert": ["convert", str(evil), "-o", str(out)],
        "embed inspect": ["embed", "inspect", str(evil)],
        "hypernet inspect": ["hypernet", "inspect", str(evil)],
        "lora check": ["lora", "check", str(inputs["a"]), str(evil)],
        "lora bake": ["lora", "bake", str(evil), str(inputs["lora"]), "-o", str(out)],
        "merge": ["merge", str(inputs["a"]), str(evil), "-o", str(out)],
        "vae swap": ["vae", "swap", str(inputs["a"]), str(evil), "-o", str(out)],
    }


def run_cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    return stopped.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("container", sorted(CONTAINERS))
@pytest.mark.parametrize("kind", KINDS)
def test_evil_pickle_never_runs(kind: str, container: str, fault_inputs: dict[str, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "PWNED"
    monkeypatch.syspath_prepend(str(tmp_path))  # where the import_module payload's module lies
    evil = evil_file(tmp_path / "evil.pt", payload(kind, marker, tmp_path), container)
    if kind != "nt.system" or os.name == "nt":  # the payload is live: torch.load runs it
        try:
            torch.load(evil, weights_only=False)
        except Exception:
            pass  # what some payloads return upsets torch afterwards; they ran all the same
        assert marker.exists(), f"the {kind} payload does not work; the test would prove nothing"
        marker.unlink()
    output = tmp_path / "out.safetensors"
    for command, argv in readers(evil, fault_inputs, output).items():
        code, lines = run_cli(capsys, argv)
        assert (code, len(lines)) == (1, 1), (command, code, lines)
        assert lines[0].startswith(f"sdkit: error: {evil}: refused pickle: forbidden global '"), (command, lines)
        assert not marker.exists(), command
        assert not output.exists(), command
