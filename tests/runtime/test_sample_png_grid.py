"""PNG `parameters` (A1111 infotext) written and read back; grids and XY plots."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from runtime_models import SIZE, TEXT_WIDTH, kohya_lora_tensors, pixels, tiny_settings, write_adapter
from sdkit.errors import SdkitError
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample import Settings
from sdkit.runtime.sample_plan import AdapterArgs
from sdkit.runtime.sample_grid import grid_image, parse_axis
from sdkit.runtime.sample_png import format_parameters, parse_hashes, parse_parameters, read_png_parameters
from sdkit.runtime.sample_run import SampleJob, run_sample

# A1111's own docstring example (modules/infotext_utils.py::parse_generation_parameters)
A1111_TEXT = """girl with an artist's beret, determined, blue eyes, desert scene, ((eyeshadow)), detailed
Negative prompt: ugly, fat, (extra_limb), (poorly drawn hands), messy drawing
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"""


def test_a1111_text_parses_into_fields():
    fields = parse_parameters(A1111_TEXT)
    assert fields["Prompt"].startswith("girl with") and fields["Prompt"].endswith("detailed")
    assert fields["Negative prompt"] == "ugly, fat, (extra_limb), (poorly drawn hands), messy drawing"
    assert [fields[k] for k in ("Steps", "Sampler", "Seed", "Size")] == ["20", "Euler a", "965400086", "512x512"]


def test_values_with_commas_or_colons_are_quoted_and_come_back():
    text = format_parameters("p", "", [("Steps", 4), ("Lora hashes", "a: 01, b: 02"), ("Model", "x"), ("VAE", None)])
    assert text == 'p\nSteps: 4, Lora hashes: "a: 01, b: 02", Model: x'
    fields = parse_parameters(text)
    assert fields["Lora hashes"] == "a: 01, b: 02" and "VAE" not in fields and fields["Negative prompt"] == ""
    assert parse_hashes(fields["Lora hashes"]) == {"a": "01", "b": "02"}


def _autov3(path) -> str:
    data = path.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + header:]).hexdigest()[:12]


def test_png_carries_the_parameters_of_what_was_sampled(sd1, tmp_path):
    lora = write_adapter(tmp_path / "style.safetensors", kohya_lora_tensors(load_model(sd1.folder).pipe, seed=3))
    embedding = write_adapter(tmp_path / "mystyle.safetensors", {"emb_params": torch.ones(1, TEXT_WIDTH)})
    job = SampleJob(model=str(sd1.file), prompts=["a mystyle photo"],
                    adapters=AdapterArgs(loras=[f"{lora}:0.5"], embeddings=[str(embedding)]),
                    settings=Settings(steps=3, cfg=5.5, seed=42, width=SIZE, height=SIZE, scheduler="dpm++2m-karras",
                                      clip_skip=2, negative="blurry, dark"))
    path = run_sample(job, tmp_path / "out.png").outputs[0]
    fields = read_png_parameters(path)
    assert fields["Prompt"] == "a mystyle photo <lora:style:0.5>"
    assert fields["Negative prompt"] == "blurry, dark"
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"]) == ("3", "DPM++ 2M", "Karras")
    assert (fields["CFG scale"], fields["Seed"], fields["Size"], fields["Clip skip"]) == ("5.5", "42", "32x32", "2")
    assert fields["Model hash"] == hashlib.sha256(sd1.file.read_bytes()).hexdigest()[:10]
    assert fields["Model"] == "tiny-sd1"
    assert parse_hashes(fields["Lora hashes"]) == {"style": _autov3(lora)}
    assert parse_hashes(fields["TI hashes"]) == {"mystyle": hashlib.sha256(embedding.read_bytes()).hexdigest()[:12]}
    assert fields["Version"].startswith("sdkit ")


def test_png_without_parameters_is_refused_in_one_line(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.jpg")
    for name, expected in (("plain.png", "no generation parameters"), ("plain.jpg", "not a PNG"),
                           ("missing.png", "no such file")):
        with pytest.raises(SdkitError, match=expected) as caught:
            read_png_parameters(tmp_path / name)
        assert "\n" not in str(caught.value)


def _ink(region: np.ndarray) -> int:
    return int((region.min(axis=-1) < 128).sum())


def test_grid_lays_pictures_out_under_labels():
    cells = [[Image.new("RGB", (64, 48), (200, 0, 0)) for _ in range(3)] for _ in range(2)]
    grid = pixels(grid_image(cells, ["seed 1", "seed 2", "seed 3"], ["a red square", "another"]))
    height, width, _ = grid.shape
    top, left = height - 2 * 48, width - 3 * 64
    assert top > 0 and left > 0
    assert (grid[top:, left:] == (200, 0, 0)).all()  # every cell where it belongs
    assert _ink(grid[:top, left:]) > 20 and _ink(grid[top:, :left]) > 20  # labels drawn
    bare = pixels(grid_image(cells, [], []))
    assert bare.shape == (2 * 48, 3 * 64, 3)


def test_axis_specifications():
    axis = parse_axis("lora_strength=0,0.5,1")
    assert axis.values == (0.0, 0.5, 1.0) and axis.label(0.5) == "lora_strength=0.5"
    assert parse_axis("steps=2, 4").values == (2, 4) and parse_axis("scheduler=ddim,euler").values == ("ddim", "euler")
    for bad in ("foo=1", "steps=a", "cfg=", "cfg"):
        with pytest.raises(SdkitError):
            parse_axis(bad)


def test_grid_of_prompts_and_seeds(sd1, tmp_path):
    job = SampleJob(model=str(sd1.file), prompts=["a photo", "cat"], batch=3, grid=True, settings=tiny_settings())
    result = run_sample(job, tmp_path / "grid.png")
    assert len(result.outputs) == 1 and [s.seed for s in result.samples] == [1, 2, 3, 1, 2, 3]
    grid = pixels(Image.open(result.outputs[0]))
    height, width, _ = grid.shape
    top, left = height - 2 * SIZE, width - 3 * SIZE
    assert top > 0 and left > 0
    for row in range(2):  # each cell is the picture drawn for that prompt and seed
        for column in range(3):
            cell = grid[top + row * SIZE:top + (row + 1) * SIZE, left + column * SIZE:left + (column + 1) * SIZE]
            assert (cell == pixels(result.samples[row * 3 + column].image)).all()
    assert read_png_parameters(result.outputs[0])["Seed"] == "1"


def test_xy_plot_over_lora_strength(sd1, tmp_path):
    lora = write_adapter(tmp_path / "style.safetensors", kohya_lora_tensors(load_model(sd1.folder).pipe, seed=3))
    job = SampleJob(model=str(sd1.file), prompts=["a photo"], adapters=AdapterArgs(loras=[str(lora)]),
                    xy=parse_axis("lora_strength=0,0.5,1"), settings=tiny_settings())
    result = run_sample(job, tmp_path / "xy.png")
    grid = pixels(Image.open(result.outputs[0]))
    assert grid.shape[1] > 3 * SIZE and grid.shape[0] > SIZE
    cells = [pixels(s.image) for s in result.samples]
    assert len(cells) == 3 and np.abs(cells[0] - cells[2]).max() > 10
    assert [parse_parameters(s.parameters)["Prompt"] for s in result.samples] == [
        "a photo <lora:style:0>", "a photo <lora:style:0.5>", "a photo <lora:style:1>"]
    plain = run_sample(SampleJob(model=str(sd1.file), prompts=["a photo"], settings=tiny_settings()),
                       tmp_path / "plain.png").samples[0]
    assert np.abs(cells[0] - pixels(plain.image)).max() == 0  # strength 0 is the model itself
