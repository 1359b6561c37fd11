"""`sdkit merge --blocks` on transformer diffusion models, and `--list-blocks`.

Two tiny models of each family (random weights, real key names, both conventions) are
merged by weighted sum through the command line; each output key must be A + w·(B − A)
with w the weight of the block its name puts it in (written here from the peers' module
names, independently of sdkit's rule).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "arch"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))

from cli_run import run_sdkit  # noqa: E402
from released import tiny_tensors  # noqa: E402
from test_transformer_blocks import expected_block  # noqa: E402

PREFIX = "model.diffusion_model."


def write_pair(folder: Path, family: str, convention: str, prefix: str = "") -> tuple[Path, Path]:
    paths = []
    for name, seed in (("a", 0), ("b", 1)):
        tensors = {prefix + key: value.contiguous() for key, value in tiny_tensors(family, convention, seed).items()}
        paths.append(folder / f"{family}-{convention}-{name}.safetensors")
        save_file(tensors, paths[-1])
    return paths[0], paths[1]


def merged_weights(a: Path, b: Path, out: Path) -> dict[str, float]:
    """Per key, the w with out = A + w·(B − A) (least squares over the tensor); keys equal
    in A and B (norm weights a model initializes to ones) tell nothing and are left out."""
    ta, tb, tm = load_file(a), load_file(b), load_file(out)
    weights = {}
    for key, merged in tm.items():
        delta = (tb[key] - ta[key]).double()
        if not delta.any():
            assert torch.equal(merged, ta[key]), key
            continue
        weights[key] = float(((merged.double() - ta[key].double()) * delta).sum() / (delta * delta).sum())
    return weights


def block_weight(block: str) -> float:
    """The weights the tests give: IN 0, OUT 0.25, D/S/B blocks 1, 0.5, 1, 0.5 by parity."""
    if block == "IN":
        return 0.0
    if block == "OUT":
        return 0.25
    return 1.0 if int(block[1:]) % 2 == 0 else 0.5


FAMILY_CONVENTIONS = [(family, convention) for family in ("flux", "flux2", "chroma", "sd3", "z-image", "qwen-image",
                                                          "lumina2", "hidream", "wan")
                      for convention in ("ldm", "diffusers")]


@pytest.mark.parametrize("family, convention", FAMILY_CONVENTIONS)
def test_named_block_weights_reach_their_keys(family, convention, tmp_path, capsys):
    a, b = write_pair(tmp_path, family, convention)
    keys = list(load_file(a))
    blocks = sorted({expected_block(family, convention, key) for key in keys})
    spec = ",".join(f"{block}:{block_weight(block)}" for block in blocks)
    out = tmp_path / "merged.safetensors"
    code, _out, err = run_sdkit(capsys, "merge", str(a), str(b), "--alpha", "0.9", "--blocks", spec, "-o", str(out))
    assert code == 0, err
    for key, weight in merged_weights(a, b, out).items():
        assert weight == pytest.approx(block_weight(expected_block(family, convention, key)), abs=1e-3), key


@pytest.mark.parametrize("family, convention", [("flux", "ldm"), ("wan", "diffusers"), ("sd3", "ldm")])
def test_a_list_of_one_value_per_block_under_the_checkpoint_prefix(family, convention, tmp_path, capsys):
    a, b = write_pair(tmp_path, family, convention, PREFIX)
    keys = [key[len(PREFIX):] for key in load_file(a)]
    order = {block: i for i, block in enumerate(_ids_in_order(keys, family, convention))}
    values = [0.1 * (i % 10) for i in range(len(order))]
    out = tmp_path / "merged.safetensors"
    code, _out, err = run_sdkit(capsys, "merge", str(a), str(b), "--blocks", ",".join(map(str, values)),
                                "-o", str(out))
    assert code == 0, err
    for key, weight in merged_weights(a, b, out).items():
        block = expected_block(family, convention, key[len(PREFIX):])
        assert weight == pytest.approx(values[order[block]], abs=1e-3), key


def _ids_in_order(keys: list[str], family: str, convention: str) -> list[str]:
    found = {expected_block(family, convention, key) for key in keys}
    stacks = sorted((b for b in found if b not in ("IN", "OUT")), key=lambda b: ("DSB".index(b[0]), int(b[1:])))
    return ["IN", *stacks, "OUT"]


def test_comfyui_key_prefixes_set_the_keys_under_them(tmp_path, capsys):
    a, b = write_pair(tmp_path, "flux", "ldm")
    out = tmp_path / "merged.safetensors"
    code, _out, err = run_sdkit(capsys, "merge", str(a), str(b), "--alpha", "0.5",
                                "--blocks", "IN:0,img_in.:1,double_blocks.0.:0.25", "-o", str(out))
    assert code == 0, err
    weights = merged_weights(a, b, out)
    assert weights["img_in.weight"] == pytest.approx(1.0, abs=1e-3)
    assert weights["txt_in.weight"] == pytest.approx(0.0, abs=1e-3)  # IN
    assert weights["double_blocks.0.img_attn.qkv.weight"] == pytest.approx(0.25, abs=1e-3)  # alias of D00
    assert weights["single_blocks.0.linear1.weight"] == pytest.approx(0.5, abs=1e-3)  # the global alpha


def test_a_preset_is_recorded_as_its_values(tmp_path, capsys):
    a, b = write_pair(tmp_path, "wan", "ldm")
    out = tmp_path / "merged.safetensors"
    code, _out, err = run_sdkit(capsys, "merge", str(a), str(b), "--blocks", "GRAD_OUT", "-o", str(out))
    assert code == 0, err
    weights = merged_weights(a, b, out)
    # IN, B00, B01, OUT at positions 0, 1/3, 2/3, 1
    assert weights["patch_embedding.weight"] == pytest.approx(0.0, abs=1e-3)
    assert weights["blocks.0.ffn.0.weight"] == pytest.approx(1 / 3, abs=1e-3)
    assert weights["blocks.1.ffn.0.weight"] == pytest.approx(2 / 3, abs=1e-3)
    assert weights["head.head.weight"] == pytest.approx(1.0, abs=1e-3)
    from safetensors import safe_open
    import json

    with safe_open(str(out), "pt") as handle:
        recipe = json.loads(handle.metadata()["sdkit.recipe"])
    assert recipe["blocks"] == pytest.approx([0, 1 / 3, 2 / 3, 1])


@pytest.mark.parametrize("blocks, expected", [
    ("BASE:0.3", "this model has no block 'BASE' (its blocks: IN, D00, S00, OUT)"),
    ("D07:1", "this model has no block 'D07' (its blocks: IN, D00, S00, OUT)"),
    ("x_embedder.:1", "no key of this model starts with 'x_embedder.' (its blocks: IN, D00, S00, OUT)"),
    ("0,1,0.5", "this model has 4 blocks (IN, D00, S00, OUT), got 3 values"),
    ("GRAD_V,1", "is not NAME:VALUE"),
    ("WRAP08", "block preset 'WRAP08' is not one for this model (its presets: ALL_A"),
])
def test_block_settings_a_transformer_cannot_take_are_refused_in_one_line(blocks, expected, tmp_path, capsys):
    a, b = write_pair(tmp_path, "flux", "ldm")
    out = tmp_path / "merged.safetensors"
    code, _out, err = run_sdkit(capsys, "merge", str(a), str(b), "--blocks", blocks, "-o", str(out))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("sdkit: error: "), err
    assert expected in lines[0]
    assert not out.exists()


def test_list_blocks_of_flux_is_the_released_layout(capsys):
    code, out, _err = run_sdkit(capsys, "merge", "--list-blocks", "flux")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("FLUX.1 (FLUX.1-dev, FLUX.1-schnell") and lines[0].endswith(": 59 blocks")
    ids = [line.split()[0] for line in lines[1:60]]
    assert ids == ["IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT"]
    assert "double_blocks.0. / transformer_blocks.0." in lines[2]
    assert lines[-1].startswith("presets: ") and "GRAD_V" in lines[-1]


@pytest.mark.parametrize("family, count, first, last", [("sd1", 26, "BASE", "OUT11"), ("sdxl", 20, "BASE", "OUT08"),
                                                        ("sd2", 26, "BASE", "OUT11"), ("wan", 42, "IN", "OUT")])
def test_list_blocks_of_other_families(family, count, first, last, capsys):
    code, out, _err = run_sdkit(capsys, "merge", "--list-blocks", family)
    assert code == 0
    header = out.splitlines()[0]
    ids = [line.split()[0] for line in out.splitlines()[1:] if line.startswith("  ")]
    assert f": {count} blocks" in header or f": {count} blocks" in out
    assert first in ids and last in ids


def test_list_blocks_of_an_unknown_family_is_one_line(capsys):
    code, _out, err = run_sdkit(capsys, "merge", "--list-blocks", "sd9")
    assert code == 1 and err.count("\n") == 1 and "unknown model family 'sd9' (known: sd1" in err


def test_a_supermerger_preset_on_an_sd1_checkpoint(tmp_path, capsys):
    from test_merge_support import checkpoint, write

    a = write(tmp_path / "a.safetensors", checkpoint("sd1", 1, torch.float32))
    b = write(tmp_path / "b.safetensors", checkpoint("sd1", 2, torch.float32))
    out = tmp_path / "merged.safetensors"
    code, _out, err = run_sdkit(capsys, "merge", str(a), str(b), "--blocks", "GRAD_V", "-o", str(out))
    assert code == 0, err
    weights = merged_weights(a, b, out)
    assert weights[PREFIX + "input_blocks.0.0.weight"] == pytest.approx(1.0, abs=1e-4)  # IN00
    assert weights[PREFIX + "middle_block.0.in_layers.2.weight"] == pytest.approx(0.0, abs=1e-4)  # M00
    assert weights[PREFIX + "output_blocks.5.0.in_layers.2.weight"] == pytest.approx(0.5, abs=1e-4)  # OUT05
    assert weights["cond_stage_model.transformer.text_model.final_layer_norm.weight"] == pytest.approx(0.0, abs=1e-4)


def test_the_unet_component_weight_is_the_transformer_s(tmp_path, capsys):
    """A transformer diffusion model is the `unet` component: --unet-alpha sets it, and
    block weights are more specific."""
    a, b = write_pair(tmp_path, "sd3", "ldm")
    out = tmp_path / "merged.safetensors"
    code, _out, err = run_sdkit(capsys, "merge", str(a), str(b), "--unet-alpha", "1", "--blocks", "B01:0.5",
                                "-o", str(out))
    assert code == 0, err
    for key, weight in merged_weights(a, b, out).items():
        assert weight == pytest.approx(0.5 if key.startswith("joint_blocks.1.") else 1.0, abs=1e-3), key
