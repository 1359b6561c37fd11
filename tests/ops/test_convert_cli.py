"""`sdkit convert` on the command line: options, reports, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import test_convert_support as S
from sdkit.cli import convert_cmd  # noqa: F401  (attaches `convert` to the group)
from sdkit.cli.main import cli, main

UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ldm = S.ldm_state("sd1")
    extra = {"model_ema.decay": torch.tensor(0.999), "alphas_cumprod": torch.rand(1000)}
    return S.write_ldm(tmp_path_factory.mktemp("cli") / "model.safetensors", {**ldm, **extra})


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["convert", *args], catch_exceptions=False)
    return result.exit_code, result.output


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", *args])
    return int(exit_info.value.code or 0), capsys.readouterr().err


def test_json_report_of_a_pruned_fp16_conversion(checkpoint, tmp_path):
    out = tmp_path / "out.safetensors"
    code, text = invoke(str(checkpoint), "-o", str(out), "--dtype", "fp16", "--prune", "--json")
    assert code == 0
    report = json.loads(text)
    assert report["prune"]["dropped"] == {"ema": 1, "scheduler": 1}
    assert report["prune"]["bytes_saved"] == 1000 * 4 + 4
    assert report["precision"]["dtype"] == "F16" and report["precision"]["overflow"]["count"] == 0
    assert report["written"] == "file" and report["family"] == "sd1"
    assert load_file(out)[UNET + "out.2.weight"].dtype == torch.float16


def test_human_report_names_what_changed(checkpoint, tmp_path):
    code, text = invoke(str(checkpoint), "-o", str(tmp_path / "vae.safetensors"), "--only", "vae", "--prune")
    assert code == 0
    assert text.startswith(f"wrote {tmp_path / 'vae.safetensors'} (file, ldm keys")
    assert "dropped (scheduler" in text and "alphas_cumprod" in text


def test_refused_input_is_one_line_and_exit_1(checkpoint, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"")
    code, err = run_main(capsys, str(checkpoint), "-o", str(out))
    assert code == 1 and err.startswith("sdkit: error: ") and err.count("\n") == 1 and "--force" in err
    code, err = run_main(capsys, str(tmp_path / "missing.ckpt"), "-o", str(tmp_path / "x.safetensors"))
    assert code == 1 and "no such file" in err


def test_clamp_and_allow_inf_exclude_each_other(checkpoint, tmp_path, capsys):
    code, err = run_main(capsys, str(checkpoint), "-o", str(tmp_path / "x.safetensors"), "--clamp", "--allow-inf")
    assert code == 2 and "exclude each other" in err
