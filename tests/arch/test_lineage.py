"""SDXL's lines of fine-tunes (NoobAI, Illustrious, Pony): the weights are SDXL base's, so
only a title or a name tells the line, and inspect says which one told it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from cli_run import run_sdkit

TOYS = Path(__file__).resolve().parents[2] / "fixtures" / "toy"


def _facts(capsys, path: Path) -> dict:
    code, out, err = run_sdkit(capsys, "inspect", "--json", str(path))
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("file_name, lineage", [
    ("waiNSFWIllustrious_v140.safetensors", "Illustrious"),
    ("ponyDiffusionV6XL.safetensors", "Pony Diffusion"),
    ("noobaiXLNAIXL_vPred10Version.safetensors", "NoobAI"),
    ("juggernautXL_v9.safetensors", None),
])
def test_the_file_name_tells_the_line(tmp_path, capsys, file_name, lineage):
    path = tmp_path / file_name
    shutil.copy(TOYS / "sdxl" / "toy-sdxl.safetensors", path)
    facts = _facts(capsys, path)
    assert facts["family"] == "sdxl-base" and facts["facts"].get("lineage") == lineage
    if lineage:
        assert any(note.startswith(f"{lineage} by its file name") for note in facts["notes"])


def test_a_title_tells_it_before_the_file_name(tmp_path, capsys):
    tensors = load_file(TOYS / "sdxl" / "toy-sdxl.safetensors")
    path = tmp_path / "illustrious-merge.safetensors"
    save_file(tensors, path, {"modelspec.title": "NoobAI-XL V-Pred 1.0"})
    facts = _facts(capsys, path)
    assert facts["facts"]["lineage"] == "NoobAI"
    assert any("by its modelspec.title 'NoobAI-XL V-Pred 1.0'" in note for note in facts["notes"])


def test_families_without_lines_name_none(tmp_path, capsys):
    path = tmp_path / "pony-style-sd15.safetensors"
    shutil.copy(TOYS / "sd1" / "toy-sd1.safetensors", path)
    assert "lineage" not in _facts(capsys, path)["facts"]
