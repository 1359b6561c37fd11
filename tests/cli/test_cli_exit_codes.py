"""Exit codes of failed checks, the family-mismatch flag apart from --force, and messages
that name a kind or a format from a variable with the right article."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cli_run import run_sdkit
from sdkit.errors import with_article

SDKIT = Path(__file__).resolve().parents[2] / "sdkit"


run = run_sdkit


# ---- inspect --deep ------------------------------------------------------------------------

@pytest.mark.parametrize(("values", "bad"), [
    ([1.0, 2.0], False),
    ([1.0, float("nan")], True),
    ([float("inf"), 0.0], True),
    ([0.0, float("-inf")], True),
])
def test_inspect_deep_exits_1_when_a_tensor_holds_nan_or_inf(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            values: list[float], bad: bool) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"clean": torch.zeros(3), "checked": torch.tensor(values, dtype=torch.float16)}, str(path))
    code, out, _ = run(capsys, "inspect", "--deep", str(path))
    assert code == (1 if bad else 0)
    assert ("NaN/Inf" in out) == bad
    code, out, _ = run(capsys, "inspect", "--deep", "--json", str(path))
    assert code == (1 if bad else 0)
    assert json.loads(out)["facts"]["nan_tensors"] == (["checked"] if bad else [])
    assert run(capsys, "inspect", str(path))[0] == 0  # without --deep nothing is read, nothing fails


# ---- library find --------------------------------------------------------------------------

def test_library_find_without_a_match_exits_1_in_every_output_form(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    library = tmp_path / "library"
    model = tmp_path / "findable.safetensors"
    save_file({"weight": torch.ones(2)}, str(model))
    assert run(capsys, "library", "init", str(library), "--layout", "comfyui")[0] == 0
    assert run(capsys, "library", "add", str(model), "--library", str(library))[0] == 0
    code, out, _ = run(capsys, "library", "find", "findable", "--library", str(library), "--json")
    assert code == 0 and len(json.loads(out)) == 1
    code, out, _ = run(capsys, "library", "find", "nothing-like-it", "--library", str(library), "--json")
    assert code == 1 and json.loads(out) == []
    code, _, err = run(capsys, "library", "find", "nothing-like-it", "--library", str(library))
    assert code == 1 and err.startswith("sdkit: error: ")


# ---- --force overwrites; --allow-family-mismatch accepts another family ------------------------

def _kohya_lora(path: Path, base_model_version: str) -> str:
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{module}.lora_down.weight": torch.randn(2, 8), f"{module}.lora_up.weight": torch.randn(8, 2),
               f"{module}.alpha": torch.tensor(2.0)}, str(path), metadata={"ss_base_model_version": base_model_version})
    return str(path)


def test_lora_merge_needs_allow_family_mismatch_not_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd1 = _kohya_lora(tmp_path / "sd1.safetensors", "sd_v1")
    sdxl = _kohya_lora(tmp_path / "sdxl.safetensors", "sdxl_base_v1-0")
    output = tmp_path / "merged.safetensors"
    output.write_bytes(b"old")
    code, _, err = run(capsys, "lora", "merge", sd1, sdxl, "-o", str(output), "--force")
    assert code == 1 and "made for sdxl-base" in err and "--allow-family-mismatch" in err
    assert output.read_bytes() == b"old"
    code, _, err = run(capsys, "lora", "merge", sd1, sdxl, "-o", str(output), "--allow-family-mismatch")
    assert code == 1 and "already exists" in err and output.read_bytes() == b"old"
    code, out, _ = run(capsys, "lora", "merge", sd1, sdxl, "-o", str(output), "--allow-family-mismatch", "--force",
                       "--json")
    assert code == 0 and json.loads(out)["layers"] == 1 and output.read_bytes() != b"old"


def test_lora_help_names_the_two_flags_apart(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("bake", "merge"):
        code, out, _ = run(capsys, "lora", command, "--help")
        assert code == 0 and "--allow-family-mismatch" in out
        force_help = out[out.index("--force"):out.index("--allow-family-mismatch")]
        assert "famil" not in force_help


# ---- articles ------------------------------------------------------------------------------

@pytest.mark.parametrize(("word", "expected"), [
    ("unknown", "an unknown"), ("embedding", "an embedding"), ("inpaint", "an inpaint"), ("ia3", "an ia3"),
    ("array", "an array"), ("object", "an object"), ("a1111", "an a1111"), ("oft", "an oft"),
    ("ldm", "an ldm"), ("sdxl-base", "an sdxl-base"), ("sd1", "an sd1"), ("fp16", "an fp16"),
    ("unet", "a unet"), ("UNet", "a UNet"), ("lora", "a lora"), ("checkpoint", "a checkpoint"),
    ("vae", "a vae"), ("diffusers", "a diffusers"), ("hypernetwork", "a hypernetwork"), ("string", "a string"),
    ("pix2pix", "a pix2pix"), ("comfyui", "a comfyui"), ("kohya", "a kohya"), ("flux", "a flux"),
])
def test_with_article_follows_how_the_word_is_said(word: str, expected: str) -> None:
    assert with_article(word) == expected


def test_a_file_of_unknown_kind_is_named_with_an(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    odd = tmp_path / "odd.safetensors"
    save_file({"alpha.beta": torch.zeros(2, 3), "gamma": torch.zeros(4)}, str(odd))
    code, _, err = run(capsys, "lora", "resize", str(odd), "--rank", "1", "-o", str(tmp_path / "r.safetensors"))
    assert code == 1 and "is an unknown file, not a LoRA" in err
    code, _, err = run(capsys, "merge", str(odd), str(odd), "-o", str(tmp_path / "m.safetensors"))
    assert code == 1 and "is an unknown file, not a model" in err


def test_no_message_writes_an_article_before_a_variable() -> None:
    """`a {kind}` reads "a unknown" for some values: messages use with_article."""
    pattern = re.compile(r"""\b[Aa]n? \{""")
    prompts = SDKIT / "runtime" / "toyscore.py"  # caption templates of the toy models, not messages
    offenders = [f"{path.relative_to(SDKIT)}:{number}: {line.strip()}"
                 for path in sorted(SDKIT.rglob("*.py")) if path != prompts
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
