"""What every written file says about itself: ModelSpec's date and data hash, a
resolution only where it is known, and inputs recorded by name (paths on request)."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli_run import exit_code
from sdkit.ops.recipe_meta import SpecFacts, build_metadata, full_paths_recorded, recorded_path

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "fixtures" / "toy"
SD1, SD1_B = TOY / "sd1" / "toy-sd1.safetensors", TOY / "sd1-b" / "toy-sd1-b.safetensors"


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as file:
        return file.metadata()


def data_section_sha256(path: Path) -> str:
    """ModelSpec's `hash_sha256`, computed here from the file's bytes: "0x" + the sha256 of
    everything after the 8-byte length and the header."""
    raw = path.read_bytes()
    return "0x" + hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()


def run(*args: str) -> None:
    assert exit_code(["--quiet", *args]) == 0, args


def outputs(tmp_path: Path) -> dict[str, Path]:
    """One output of each writing operation, from the toy models."""
    made = {name: tmp_path / f"{name}.safetensors" for name in ("merge", "lora", "bake", "bf16", "vae", "resized")}
    run("merge", str(SD1), str(SD1_B), "--alpha", "0.3", "-o", str(made["merge"]))
    run("lora", "extract", str(SD1_B), str(SD1), "--rank", "4", "-o", str(made["lora"]))
    run("lora", "bake", str(SD1), f"{made['lora']}:0.5", "-o", str(made["bake"]))
    run("lora", "resize", str(made["lora"]), "--rank", "2", "-o", str(made["resized"]))
    # the toy is stored in fp16: a cast to fp16 would only copy it, which convert refuses
    run("convert", str(SD1), "--dtype", "bf16", "-o", str(made["bf16"]))
    run("vae", "extract", str(SD1), "-o", str(made["vae"]))
    return made


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return outputs(tmp_path_factory.mktemp("outputs"))


@pytest.mark.parametrize("operation", ["merge", "lora", "bake", "bf16", "vae", "resized"])
def test_every_output_carries_modelspec_date_and_the_hash_of_its_data(written, operation):
    path = written[operation]
    meta = metadata(path)
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.hash_sha256"] == data_section_sha256(path)
    made_at = datetime.fromisoformat(meta["modelspec.date"])
    assert made_at.tzinfo is not None and abs(datetime.now(timezone.utc) - made_at) < timedelta(hours=1)


@pytest.mark.parametrize("direct_io", ["on", "off"])
def test_the_data_hash_holds_through_both_write_paths_and_kernel_copies(tmp_path, monkeypatch, direct_io):
    """A VAE swap copies most tensors unchanged (kernel copies / reads into the staging
    buffers): the hash must cover those bytes too, whichever way the file was written."""
    monkeypatch.setenv("SDKIT_DIRECT_IO", direct_io)
    vae = tmp_path / "vae.safetensors"
    run("vae", "extract", str(SD1_B), "-o", str(vae))
    swapped = tmp_path / "swapped.safetensors"
    run("vae", "swap", str(SD1), str(vae), "-o", str(swapped))
    assert metadata(swapped)["modelspec.hash_sha256"] == data_section_sha256(swapped)


def test_the_data_hash_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("SDKIT_DATA_HASH", "off")
    output = tmp_path / "m.safetensors"
    run("merge", str(SD1), str(SD1_B), "--alpha", "0.3", "-o", str(output))
    meta = metadata(output)
    assert "modelspec.hash_sha256" not in meta and "0x<" not in "".join(meta.values())


def test_source_date_epoch_fixes_the_date_so_a_merge_can_repeat_its_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    first, second = tmp_path / "one" / "m.safetensors", tmp_path / "two" / "m.safetensors"
    for path in (first, second):
        path.parent.mkdir()
        run("merge", str(SD1), str(SD1_B), "--alpha", "0.3", "-o", str(path))
    assert metadata(first)["modelspec.date"] == "2023-11-14T22:13:20+00:00"
    assert first.read_bytes() == second.read_bytes()


def test_inputs_are_recorded_by_name_unless_paths_are_asked_for(written, tmp_path):
    config = TOY / "sd1" / "diffusers"
    run("convert", str(SD1), "--to", "diffusers", "--config", str(config), "-o", str(tmp_path / "folder"))
    embedding = tmp_path / "sks.safetensors"
    save_file({"emb_params": torch.ones(1, 32)}, str(embedding))  # the toy's text width
    run("embed", "add", str(SD1), f"{embedding}:sks", "--to", "diffusers", "--config", str(config),
        "-o", str(tmp_path / "embedded"))
    folder_files = sorted([*(tmp_path / "folder").glob("*/*.safetensors"),
                           *(tmp_path / "embedded").glob("*/*.safetensors")])
    assert len(folder_files) >= 6
    for path in [*written.values(), *folder_files]:
        values = metadata(path).values()
        assert not [value for value in values if str(ROOT) in value or str(path.parent) in value], path
    recipe = json.loads(metadata(written["merge"])["sdkit.recipe"])
    assert [item["path"] for item in recipe["inputs"]] == [SD1.name, SD1_B.name]
    with_paths = tmp_path / "with-paths.safetensors"
    run("--record-paths", "lora", "bake", str(SD1), f"{written['lora']}:0.5", "-o", str(with_paths))
    inputs = json.loads(metadata(with_paths)["sdkit.recipe"])["inputs"]
    assert [item["path"] for item in inputs] == [str(SD1), str(written["lora"])]


def test_recorded_paths_are_names_outside_the_opt_in_block(tmp_path):
    assert recorded_path(tmp_path / "a" / "b.safetensors") == "b.safetensors"
    with full_paths_recorded():
        assert recorded_path(Path("rel") / "b.safetensors") == str(Path.cwd() / "rel" / "b.safetensors")
    assert recorded_path("rel/b.safetensors") == "b.safetensors"


def test_a_replayed_merge_finds_its_inputs_by_hash_when_they_are_elsewhere(written, tmp_path):
    """The recipe holds names only and the inputs lie neither beside the merged file nor in
    the working folder: they are found through the hashes sdkit remembered."""
    moved = tmp_path / "elsewhere.safetensors"
    moved.write_bytes(written["merge"].read_bytes())
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        run("merge", "--replay", str(moved))
    finally:
        os.chdir(cwd)


# ---- resolution ------------------------------------------------------------------------

def test_a_model_of_non_standard_size_gets_no_family_resolution(written):
    """The toys draw 32-pixel pictures: the family's 512x512 would be a false statement."""
    for operation in ("merge", "bake", "bf16", "vae"):
        assert "modelspec.resolution" not in metadata(written[operation]), operation


@pytest.mark.parametrize("facts,carried,expected", [
    (SpecFacts(family="sd1"), {}, "512x512"),
    (SpecFacts(family="sdxl-base"), {}, "1024x1024"),
    (SpecFacts(family="sd2", prediction="v"), {}, "768x768"),
    (SpecFacts(family="sd1", nonstandard=True), {}, None),
    (SpecFacts(family="sd1"), {"modelspec.resolution": "640x640"}, "640x640"),
    (SpecFacts(family="sd1", nonstandard=True), {"modelspec.resolution": "32x32"}, "32x32"),
    (SpecFacts(family="sd1", resolution=32), {"modelspec.resolution": "512x512"}, "32x32"),
])
def test_resolution_comes_from_the_model_then_the_input_then_the_family(tmp_path, facts, carried, expected):
    source = tmp_path / "in.safetensors"
    source.write_bytes(b"not read: its hash is given")
    meta = build_metadata("test", [source], {}, facts, carried=carried, hashes={str(source): "0" * 64})
    assert meta.get("modelspec.resolution") == expected
