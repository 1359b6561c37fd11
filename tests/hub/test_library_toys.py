"""The committed toy models and an adapter extracted from them go where each layout wants them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sdkit.hub.library import Library
from sdkit.ops.lora.extract import ExtractOptions, extract_lora

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy"
pytestmark = pytest.mark.skipif(not (TOY / "sd1" / "toy-sd1.safetensors").is_file(),
                                reason="toy models not built (make fixtures)")

LAYOUT_FOLDERS = {
    "a1111": {"checkpoint": "models/Stable-diffusion", "vae": "models/VAE", "lora": "models/Lora"},
    "comfyui": {"checkpoint": "models/checkpoints", "vae": "models/vae", "lora": "models/loras"},
}


@pytest.fixture(scope="module")
def toy_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "b-minus-a.safetensors"
    extract_lora(TOY / "sd1-b" / "toy-sd1-b.safetensors", TOY / "sd1" / "toy-sd1.safetensors", path,
                 ExtractOptions(rank=4))
    return path


@pytest.mark.parametrize("layout", sorted(LAYOUT_FOLDERS))
def test_toy_files_are_filed_by_kind_and_family(layout: str, tmp_path: Path, toy_lora: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    # names that say nothing: the placement must come from the content
    files = {"one.safetensors": (TOY / "sd1" / "toy-sd1.safetensors", "checkpoint", "sd1"),
             "two.safetensors": (TOY / "sdxl" / "toy-sdxl.safetensors", "checkpoint", "sdxl-base"),
             "three.safetensors": (TOY / "sd1" / "toy-sd1.vae.safetensors", "vae", None),
             "four.safetensors": (toy_lora, "lora", "sd1")}
    for name, (source, _, _) in files.items():
        shutil.copy(source, inbox / name)
    with Library.init(tmp_path / "lib", layout) as library:
        library.add([inbox / name for name in files])
        entries = {Path(e.path).name: e for e in library.index.entries()}
    folders = LAYOUT_FOLDERS[layout]
    for name, (_, kind, family) in files.items():
        entry = entries[name]
        assert entry.path == f"{folders[kind]}/{name}"
        assert entry.kind == kind
        if family:
            assert entry.family == family


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count open files")
def test_identifying_files_leaves_none_open(toy_lora: Path) -> None:
    from sdkit.hub.library.library import identify_file

    before = len(list(Path("/proc/self/fd").iterdir()))
    kinds = [identify_file(path)[0] for path in (TOY / "sd1" / "toy-sd1.safetensors", toy_lora)]
    assert kinds == ["checkpoint", "lora"]
    assert len(list(Path("/proc/self/fd").iterdir())) == before
