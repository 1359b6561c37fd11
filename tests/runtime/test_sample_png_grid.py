"""PNG `parameters` (A1111 infotext) written and read back; grids and XY plots."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from runtime_models import SIZE, TEXT_WIDTH, kohya_lora_tensors, pixels, tiny_settings, write_adapter
from sdkit.errors import SdkitError
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample.sampler import Settings
from sdkit.runtime.sample.plan import AdapterArgs
from sdkit.runtime.sample.grid import grid_image, grid_layout, parse_axis
from sdkit.runtime.sample.png import format_parameters, parse_hashes, parse_parameters, read_png_parameters
from sdkit.runtime.sample.run import SampleJob, run_sample

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


def test_inspect_json_of_a_png_types_every_field_and_maps_the_hashes(tmp_path, capsys):
    from sdkit.cli.main import main

    text = ('a <lora:style:0.8> cat <lora:other:0.5:1>\nNegative prompt: blurry, dark\n'
            'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 965400086, '
            'Size: 512x768, Model hash: 45dee52b, Model: base, Clip skip: 2, '
            'Lora hashes: "style: 0123456789ab, other: ba9876543210", TI hashes: "sks: 00112233aabb", '
            'Denoising strength: 0.4, Hires upscaler: Latent, Version: v1.10.1')
    path = tmp_path / "made-elsewhere.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    main(["inspect", str(path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["Steps"] == "20"  # the fields as written stay
    generation = report["generation"]
    assert (generation["prompt"], generation["negative_prompt"]) == (
        "a <lora:style:0.8> cat <lora:other:0.5:1>", "blurry, dark")
    assert (generation["steps"], generation["cfg_scale"], generation["seed"], generation["clip_skip"]) == (
        20, 7.5, 965400086, 2)
    assert (generation["width"], generation["height"], generation["denoising_strength"]) == (512, 768, 0.4)
    assert (generation["sampler"], generation["schedule_type"], generation["model_hash"]) == (
        "DPM++ 2M", "Karras", "45dee52b")
    assert generation["lora_hashes"] == {"style": "0123456789ab", "other": "ba9876543210"}
    assert generation["ti_hashes"] == {"sks": "00112233aabb"}
    assert generation["networks"] == [
        {"kind": "lora", "name": "style", "te_strength": 0.8, "unet_strength": 0.8},
        {"kind": "lora", "name": "other", "te_strength": 0.5, "unet_strength": 1.0}]
    assert generation["other"] == {"Hires upscaler": "Latent"} and generation["version"] == "v1.10.1"


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


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("cell", [(8, 8), (32, 32), (64, 48)])
def test_grid_labels_never_overlap_each_other_or_the_pictures(cell):
    """XY labels on small pictures (`lora_strength=0.75` is wider than a 32-pixel cell):
    slots widen instead of labels running into their neighbours."""
    columns = [f"lora_strength={v}" for v in ("0", "0.25", "0.75", "1")]
    rows = ["scheduler=dpm++2m-karras", "scheduler=euler-a,with,commas", "x" * 40]
    cells = [[Image.new("RGB", cell, (200, 0, 0)) for _ in columns] for _ in rows]
    layout = grid_layout(len(rows), len(columns), cell, columns, rows)
    cell_boxes = [box for row in layout.cells for box in row]
    label_boxes = [box for box, _ in layout.labels]
    boxes = cell_boxes + label_boxes
    assert all(not _overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(0 <= b[0] and 0 <= b[1] and b[2] <= layout.size[0] and b[3] <= layout.size[1] for b in boxes)
    assert all((b[2] - b[0], b[3] - b[1]) == cell for b in cell_boxes)
    grid = pixels(grid_image(cells, columns, rows))
    assert grid.shape[:2] == (layout.size[1], layout.size[0])
    for left, top, right, bottom in cell_boxes:
        assert (grid[top:bottom, left:right] == (200, 0, 0)).all()
    ink = grid.min(axis=-1) < 128
    for left, top, right, bottom in boxes:
        ink[top:bottom, left:right] = False
    assert not ink.any()  # every stroke of text lies in its label's box


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
    assert [s.seed for s in result.samples] == [1, 2, 3, 1, 2, 3]
    # the grid, then each picture on its own with its own parameters, as A1111 saves them
    assert result.outputs == [tmp_path / "grid.png", *(tmp_path / f"grid-{n}.png" for n in range(6))]
    for sample, single in zip(result.samples, result.outputs[1:]):
        assert (pixels(Image.open(single)) == pixels(sample.image)).all()
        assert read_png_parameters(single)["Seed"] == str(sample.seed)
    grid = pixels(Image.open(result.outputs[0]))
    layout = grid_layout(2, 3, (SIZE, SIZE), ["seed 1", "seed 2", "seed 3"], ["a photo", "cat"])
    assert grid.shape[:2] == (layout.size[1], layout.size[0])
    for row in range(2):  # each cell is the picture drawn for that prompt and seed
        for column in range(3):
            left, top, right, bottom = layout.cells[row][column]
            assert top > 0 and left > 0
            assert (grid[top:bottom, left:right] == pixels(result.samples[row * 3 + column].image)).all()
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
