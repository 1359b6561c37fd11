"""Libraries: layouts, placement by identified kind, incremental scans, dupes, verify."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from sdkit.errors import SdkitError
from sdkit.hub.library import (Library, detect_layout, open_for_scan, scan_library,
                                verify_library)
from sdkit.hub.library.index import IndexDamaged

# Where each WebUI looks for each kind (A1111 cmd_args / extensions; ComfyUI folder_paths.py)
A1111_FOLDERS = {"checkpoint": "models/Stable-diffusion", "vae": "models/VAE",
                 "lora": "models/Lora", "embedding": "embeddings"}
COMFYUI_FOLDERS = {"checkpoint": "models/checkpoints", "vae": "models/vae",
                   "lora": "models/loras", "embedding": "models/embeddings"}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_init_creates_each_layout_and_keeps_it(tmp_path: Path) -> None:
    with Library.init(tmp_path / "webui", "a1111"):
        pass
    for folder in [*A1111_FOLDERS.values(), "models/hypernetworks", "models/ControlNet"]:
        assert (tmp_path / "webui" / folder).is_dir(), folder
    with Library.init(tmp_path / "comfy", "comfyui"):
        pass
    for folder in [*COMFYUI_FOLDERS.values(), "models/diffusion_models", "models/text_encoders",
                   "models/hypernetworks", "models/controlnet"]:
        assert (tmp_path / "comfy" / folder).is_dir(), folder
    with Library.open(tmp_path / "comfy") as library:
        assert library.layout is not None and library.layout.name == "comfyui"
    with pytest.raises(SdkitError, match="already a comfyui library"):
        Library.init(tmp_path / "comfy", "a1111")


@pytest.mark.parametrize("layout, folders", [("a1111", A1111_FOLDERS), ("comfyui", COMFYUI_FOLDERS)])
def test_files_land_where_their_content_says(layout: str, folders: dict[str, str], tmp_path: Path,
                                             model_files: dict[str, Path]) -> None:
    # misleading names: placement must follow the content, not the name
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    names = {"checkpoint": "lora-checkpoint.safetensors", "vae": "model.safetensors",
             "lora": "vae-ft-mse.safetensors", "embedding": "hypernet.pt"}
    for kind, name in names.items():
        shutil.copy(model_files[kind], inbox / name)
    with Library.init(tmp_path / "lib", layout) as library:
        placements = library.add([inbox / name for name in names.values()])
        entries = {e.path: e for e in library.index.entries()}
    for (kind, name), placement in zip(names.items(), placements):
        expected = f"{folders[kind]}/{name}"
        assert placement.entry.path == expected
        assert (tmp_path / "lib" / expected).read_bytes() == model_files[kind].read_bytes()
        assert entries[expected].kind == kind and entries[expected].sha256 == sha256_of(model_files[kind])
    assert entries[f"{folders['lora']}/vae-ft-mse.safetensors"].family == "sd1"
    assert entries[f"{folders['lora']}/vae-ft-mse.safetensors"].adapter_type == "lora"
    assert sorted(p.name for p in inbox.iterdir()) == sorted(names.values())  # copied, not moved


def test_family_subfolders_and_move(tmp_path: Path, model_files: dict[str, Path]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for kind in ("lora", "vae"):
        shutil.copy(model_files[kind], inbox / model_files[kind].name)
    with Library.init(tmp_path / "lib", "a1111", family_subfolders=True) as library:
        lora, vae = library.add([inbox / "tiny-lora.safetensors", inbox / "tiny-vae.safetensors"],
                                method="move")
    assert lora.entry.path == "models/Lora/sd1/tiny-lora.safetensors"
    assert vae.entry.path == "models/VAE/tiny-vae.safetensors"  # a VAE fits several families
    assert list(inbox.iterdir()) == []


def test_invokeai_like_layout_is_family_then_type(tmp_path: Path, model_files: dict[str, Path]) -> None:
    with Library.init(tmp_path / "lib", "invokeai-like") as library:
        placements = library.add([model_files["checkpoint"], model_files["lora"], model_files["vae"]],
                                 method="link")
    assert [p.entry.path for p in placements] == ["sd1/main/tiny-checkpoint.safetensors",
                                                  "sd1/lora/tiny-lora.safetensors",
                                                  "any/vae/tiny-vae.safetensors"]
    assert os.path.samefile(placements[1].path, model_files["lora"])  # a hard link


def test_adding_the_same_bytes_twice_is_already_present(tmp_path: Path, model_files: dict[str, Path]) -> None:
    copy = tmp_path / "again.safetensors"
    shutil.copy(model_files["lora"], copy)
    with Library.init(tmp_path / "lib", "comfyui") as library:
        first, second = library.add([model_files["lora"], copy])
        assert (first.status, second.status) == ("installed", "already-present")
        assert second.path == first.path and len(library.index.entries()) == 1


def test_name_taken_by_other_bytes_is_refused_or_renamed(tmp_path: Path, model_files: dict[str, Path]) -> None:
    other = tmp_path / "other" / "tiny-lora.safetensors"
    other.parent.mkdir()
    other.write_bytes(model_files["lora"].read_bytes()[:-4] + b"\0\0\0\0")  # same name, other bytes
    with Library.init(tmp_path / "lib", "comfyui") as library:
        library.add([model_files["lora"]])
        with pytest.raises(SdkitError, match="--rename"):
            library.add([other])
        [renamed] = library.add([other], policy="rename")
    assert renamed.entry.path == "models/loras/tiny-lora (1).safetensors"


def build_webui_tree(root: Path, model_files: dict[str, Path]) -> None:
    """An A1111 tree made by hand, as a user has it before sdkit ever ran."""
    for kind, folder in A1111_FOLDERS.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(model_files[kind], root / folder / model_files[kind].name)
    (root / "models" / "Lora" / "notes.txt").write_text("not a model")


def test_scan_detects_the_layout_and_rehashes_only_what_changed(tmp_path: Path,
                                                                 model_files: dict[str, Path]) -> None:
    root = tmp_path / "webui"
    build_webui_tree(root, model_files)
    library, rebuilt = open_for_scan(root)
    with library:
        first = scan_library(library)
        assert library.layout is not None and library.layout.name == "a1111" and not rebuilt
        assert (first.files, first.added, first.rehashed) == (4, 4, 4)
        kinds = {e.path: e.kind for e in library.index.entries()}
        assert kinds == {f"{A1111_FOLDERS[k]}/{model_files[k].name}": k for k in A1111_FOLDERS}

        second = scan_library(library)
        assert (second.rehashed, second.unchanged) == (0, 4)

        lora = root / A1111_FOLDERS["lora"] / "tiny-lora.safetensors"
        os.utime(lora, ns=(lora.stat().st_atime_ns, lora.stat().st_mtime_ns + 10**9))
        (root / A1111_FOLDERS["embedding"] / "tiny-embedding.pt").unlink()
        third = scan_library(library)
        assert (third.rehashed, third.updated, third.removed, third.unchanged) == (1, 1, 1, 2)


def test_scan_keeps_hub_facts_of_a_moved_file(tmp_path: Path, model_files: dict[str, Path]) -> None:
    with Library.init(tmp_path / "lib", "comfyui") as library:
        [placed] = library.add([model_files["lora"]])
        placed.entry.source, placed.entry.trigger_words = "civitai:1@2", ["word"]
        library.update_entry(placed.entry)
        (tmp_path / "lib" / "models" / "loras" / "sd").mkdir()
        placed.path.rename(tmp_path / "lib" / "models" / "loras" / "sd" / "moved.safetensors")
        report = scan_library(library)
        [entry] = library.index.entries()
    assert (report.added, report.removed) == (1, 1)
    assert entry.path == "models/loras/sd/moved.safetensors"
    assert (entry.source, entry.trigger_words) == ("civitai:1@2", ["word"])


def test_dupes_find_and_verify(tmp_path: Path, model_files: dict[str, Path]) -> None:
    root = tmp_path / "webui"
    build_webui_tree(root, model_files)
    shutil.copy(model_files["lora"], root / "models" / "Lora" / "copy of lora.safetensors")
    library, _ = open_for_scan(root)
    with library:
        scan_library(library)
        [group] = library.index.duplicates()
        assert sorted(e.path for e in group) == ["models/Lora/copy of lora.safetensors",
                                                 "models/Lora/tiny-lora.safetensors"]

        sha = sha256_of(model_files["vae"])
        for query in (sha[:8], sha[:10].upper(), "TINY-VAE"):
            assert [e.path for e in library.index.find(query)] == ["models/VAE/tiny-vae.safetensors"]
        assert library.index.find("nothing-like-this") == []

        assert verify_library(library).ok
        vae = root / "models" / "VAE" / "tiny-vae.safetensors"
        data = bytearray(vae.read_bytes())
        data[-1] ^= 0xFF  # same size, other bytes: a silent corruption
        vae.write_bytes(bytes(data))
        (root / "embeddings" / "tiny-embedding.pt").unlink()
        report = verify_library(library)
    assert report.changed == ["models/VAE/tiny-vae.safetensors"]
    assert report.missing == ["embeddings/tiny-embedding.pt"]
    assert report.rehashed == 1 and not report.ok


def test_damaged_index_is_refused_then_rebuilt_by_scan(tmp_path: Path, model_files: dict[str, Path]) -> None:
    root = tmp_path / "webui"
    build_webui_tree(root, model_files)
    library, _ = open_for_scan(root)
    with library:
        scan_library(library)
    index = root / ".sdkit" / "index.sqlite"
    for side in ("index.sqlite-wal", "index.sqlite-shm"):
        (root / ".sdkit" / side).unlink(missing_ok=True)
    index.write_bytes(b"this is not a database" * 100)
    with pytest.raises(IndexDamaged, match="damaged.*library scan"):
        Library.open(root)
    library, rebuilt = open_for_scan(root)
    with library:
        report = scan_library(library)
        assert rebuilt and report.added == 4 and library.layout.name == "a1111"
    assert any(p.name.startswith("index.sqlite.damaged-") for p in (root / ".sdkit").iterdir())
    assert sqlite3.connect(index).execute("PRAGMA integrity_check").fetchone() == ("ok",)


# What WebUI roots look like, and folders that merely share a name with one of their parts
FRESH_A1111 = ["models/Stable-diffusion", "models/VAE-approx", "models/karlo", "embeddings"]
RUN_A1111 = ["models/Stable-diffusion", "models/VAE", "models/Lora", "embeddings", "models/hypernetworks"]
FORGE = RUN_A1111 + ["models/ControlNet", "models/text_encoder"]
COMFYUI = ["models/checkpoints", "models/loras", "models/vae", "models/diffusion_models",
           "models/text_encoders", "models/embeddings", "models/upscale_models"]
NOT_ROOTS = [
    ["my-model/vae", "my-model/unet", "my-model/text_encoder"],  # a diffusers folder in it
    ["sdxl/lora", "any/vae"],                                    # looks like invokeai-like
    ["vae", "unet", "lora"],
    ["models"],
    ["models/Stable-diffusion"],
    ["models/Stable-diffusion", "embeddings"],                   # one companion is not enough
    ["models/checkpoints", "models/vae", "models/embeddings"],   # no loras folder
    ["models/checkpoints", "models/loras"],                      # nothing else of ComfyUI's
    ["random/stuff"],
    RUN_A1111 + COMFYUI,                                         # both: ambiguous
]


@pytest.mark.parametrize("folders, layout", [
    (FRESH_A1111, "a1111"), (RUN_A1111, "a1111"), (FORGE, "a1111"), (COMFYUI, "comfyui"),
    (["models/checkpoints", "models/loras", "models/vae"], "comfyui"),
    *[(folders, None) for folders in NOT_ROOTS],
])
def test_webui_roots_are_recognised_by_several_folders(tmp_path: Path, folders: list[str],
                                                         layout: str | None) -> None:
    for folder in folders:
        (tmp_path / folder).mkdir(parents=True)
    found = detect_layout(tmp_path)
    assert (found.name if found else None) == layout
    if layout is None:
        with pytest.raises(SdkitError, match="not an sdkit library"):
            Library.open(tmp_path)
        with pytest.raises(SdkitError, match="not an sdkit library"):
            open_for_scan(tmp_path)
        assert not (tmp_path / ".sdkit").exists()


def test_folder_without_layout_or_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SdkitError, match="not an sdkit library.*library init"):
        Library.open(tmp_path)
