"""What is a library, what reading one may touch, what may enter one; `hash` of a folder;
`--force` (and its old name `--overwrite`) on download and library add."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest

from conftest import kohya_lora, payload
from hub_fakes import Blob, FakeCivitai, FileHost
from cli_run import run_sdkit

A1111_ROOT = ["models/Stable-diffusion", "models/VAE", "models/Lora", "embeddings"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `sdkit --quiet ARGS`."""
    return run_sdkit(capsys, "--quiet", *args)


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` (hidden ones too) with a digest of each file's bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
            for p in sorted(root.rglob("*"))}


def make_folders(root: Path, folders: list[str]) -> Path:
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    return root


# --- reading never creates --------------------------------------------------------------------

READ_ONLY = [["ls"], ["find", "abc"], ["dupes"], ["verify"]]


@pytest.mark.parametrize("place", ["unrelated", "webui-root"])
def test_reading_commands_create_nothing(place: str, tmp_path: Path, fake_civitai: FakeCivitai,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    if place == "unrelated":  # a folder that merely holds a diffusers model
        root = make_folders(tmp_path / "work", ["a-model/vae", "a-model/unet", "a-model/text_encoder"])
        expected = "not an sdkit library"
    else:
        root = make_folders(tmp_path / "webui", A1111_ROOT)
        expected = "an a1111 folder that sdkit has not indexed yet; index it with `sdkit library scan"
    lora = kohya_lora(root / "mystery.safetensors")
    before = tree(tmp_path)
    monkeypatch.chdir(root)
    for command in READ_ONLY:
        for where in ([], ["--library", str(root)]):
            code, out, err = run(capsys, "library", *command, *where)
            assert (code, out) == (1, ""), (command, where)
            assert err.startswith(f"sdkit: error: {root}: {expected}") and len(err.splitlines()) == 1
    code, _, err = run(capsys, "library", "lookup", str(lora), "--library", str(root))
    assert code == 1 and expected in err
    code, _, err = run(capsys, "library", "lookup", str(lora))  # asks Civitai, stores nowhere
    assert code == 1 and "Civitai does not know this file" in err
    assert tree(tmp_path) == before


def test_writing_commands_refuse_a_folder_that_is_no_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folders(tmp_path / "work", ["a-model/vae", "a-model/unet"])
    lora = kohya_lora(tmp_path / "style.safetensors")
    before = tree(tmp_path)
    monkeypatch.chdir(root)
    for args in (["scan"], ["scan", str(root)], ["add", str(lora)], ["add", str(lora), "--library", str(root)]):
        code, _, err = run(capsys, "library", *args)
        assert code == 1 and "not an sdkit library" in err and "library init" in err, args
    assert tree(tmp_path) == before


def test_a_webui_root_is_indexed_by_scan_then_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folders(tmp_path / "webui", A1111_ROOT)
    kohya_lora(root / "models" / "Lora" / "style.safetensors")
    code, out, err = run(capsys, "library", "scan", str(root), "--json")
    assert code == 0, err
    assert json.loads(out)["layout"] == "a1111" and (root / ".sdkit" / "index.sqlite").is_file()
    code, out, _ = run(capsys, "library", "ls", "--library", str(root), "--json")
    assert [e["path"] for e in json.loads(out)] == ["models/Lora/style.safetensors"]


# --- what may enter a library -------------------------------------------------------------------

class _Reduces:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (os.getpid, ())


GARBAGE = {
    "random.safetensors": payload(4096, seed=5),
    "notes.ckpt": b"just some notes, not a model\n",
    "empty.pt": b"",
    "truncated.safetensors": struct.pack("<Q", 1 << 20) + b'{"a": {"dtype": "F32"',
    "code.pt": pickle.dumps(_Reduces()),
    "readme.txt": b"hello",
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_library_add_refuses_what_inspect_refuses(name: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    library = tmp_path / "lib"
    assert run(capsys, "library", "init", str(library), "--layout", "comfyui")[0] == 0
    garbage = tmp_path / name
    garbage.write_bytes(GARBAGE[name])
    good = kohya_lora(tmp_path / "good.safetensors")
    code, _, inspect_err = run(capsys, "inspect", str(garbage))
    assert code == 1 and inspect_err.startswith("sdkit: error: ")
    before = set(tree(library))  # paths only: SQLite rewrites its own pages on every open
    for files in ([garbage], [good, garbage]):
        code, out, err = run(capsys, "library", "add", *map(str, files), "--library", str(library))
        assert (code, out, err) == (1, "", inspect_err), files
    assert set(tree(library)) == before  # nothing copied…
    assert json.loads(run(capsys, "library", "ls", "--library", str(library), "--json")[1]) == []  # …nor indexed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["lib", name, "good.safetensors"])


# --- hash of a folder ------------------------------------------------------------------------------

@pytest.mark.parametrize("folders", [["unet", "vae", "text_encoder"], []])
def test_hash_refuses_a_folder(folders: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_folders(tmp_path / "model", folders)
    folder.mkdir(exist_ok=True)
    (folder / "model_index.json").write_text("{}")
    lora = kohya_lora(tmp_path / "style.safetensors")
    for args in ([str(folder)], [str(folder), "--json"], [str(lora), str(folder)], [str(lora), str(folder), "--json"]):
        code, out, err = run(capsys, "hash", *args)
        assert (code, out) == (1, ""), args
        assert err.splitlines() == [f"sdkit: error: {folder}: a folder has no single hash; give the "
                                    "model files in it instead (e.g. its */*.safetensors)"]
    code, out, _ = run(capsys, "hash", str(lora), "--json")
    assert code == 0 and json.loads(out)[0]["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()


# --- --force, and --overwrite kept for old scripts -------------------------------------------------

@pytest.mark.parametrize("flag", ["--force", "--overwrite"])
def test_download_replaces_a_taken_name_with_force(flag: str, file_host: FileHost, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = payload(3000, seed=6)
    file_host.blobs["m.safetensors"] = Blob(data, etag='"m"')
    (tmp_path / "m.safetensors").write_bytes(b"someone else's")
    code, _, err = run(capsys, "download", file_host.url("m.safetensors"), "-o", str(tmp_path))
    assert code == 1 and "use --rename to keep both or --force to replace it" in err
    code, _, err = run(capsys, "download", file_host.url("m.safetensors"), "-o", str(tmp_path), flag)
    assert code == 0, err
    assert (tmp_path / "m.safetensors").read_bytes() == data
    code, _, err = run(capsys, "download", file_host.url("m.safetensors"), "--rename", flag)
    assert code == 2 and "--rename and --force exclude each other" in err


@pytest.mark.parametrize("flag", ["--force", "--overwrite"])
def test_library_add_replaces_a_taken_name_with_force(flag: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    library = tmp_path / "lib"
    run(capsys, "library", "init", str(library), "--layout", "comfyui")
    first, second = tmp_path / "a", tmp_path / "b"
    kohya_lora(first.mkdir() or first / "style.safetensors", seed=1)
    kohya_lora(second.mkdir() or second / "style.safetensors", seed=2)
    assert run(capsys, "library", "add", str(first / "style.safetensors"), "--library", str(library))[0] == 0
    code, _, err = run(capsys, "library", "add", str(second / "style.safetensors"), "--library", str(library))
    assert code == 1 and "--force to replace it" in err
    code, out, err = run(capsys, "library", "add", str(second / "style.safetensors"), "--library",
                         str(library), flag, "--json")
    assert code == 0, err
    placed = library / "models" / "loras" / "style.safetensors"
    assert placed.read_bytes() == (second / "style.safetensors").read_bytes()
    assert [e["sha256"] for e in json.loads(out)] == [hashlib.sha256(placed.read_bytes()).hexdigest()]


@pytest.mark.parametrize("command", [["download"], ["library", "add"]])
def test_help_shows_force_not_overwrite(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0 and "--force" in out and "--overwrite" not in out


def test_scan_still_rebuilds_a_library_from_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    library = tmp_path / "lib"
    run(capsys, "library", "init", str(library), "--layout", "comfyui")
    shutil.copy(kohya_lora(tmp_path / "s.safetensors"), library / "models" / "loras" / "s.safetensors")
    code, out, _ = run(capsys, "library", "scan", str(library), "--json")
    assert code == 0 and json.loads(out)["added"] == 1
