"""SDXL v-prediction and zero-terminal-SNR models (NoobAI-XL v-pred and its kin) stay so
through conversion: a diffusers scheduler's `prediction_type` / `rescale_betas_zero_snr`
become the single file's `v_pred` / `ztsnr` marker keys (what ComfyUI reads), and back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from sdkit.arch import identify
from sdkit.io import open_model
from sdkit.ops.convert.model import ConvertOptions, convert_model

TOY_SDXL = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "sdxl" / "diffusers"


@pytest.fixture
def vpred_folder(tmp_path: Path) -> Path:
    if not TOY_SDXL.is_dir():
        pytest.skip("toy fixtures not built (fixtures/toy/build.py)")
    folder = tmp_path / "vpred"
    shutil.copytree(TOY_SDXL, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    config_path.write_text(json.dumps(config))
    return folder


def identity_of(path: Path):
    with open_model(path) as model:
        return identify(model)


def test_markers_are_written_into_the_single_file_and_read_back(vpred_folder: Path, tmp_path: Path) -> None:
    folder_identity = identity_of(vpred_folder)
    assert folder_identity.prediction == "v"
    assert folder_identity.facts["zero_terminal_snr"] == "scheduler config rescale_betas_zero_snr"
    single = tmp_path / "vpred.safetensors"
    convert_model(vpred_folder, single, ConvertOptions(to="single-file"))
    with safe_open(single, "pt") as handle:
        assert {"v_pred", "ztsnr"} <= set(handle.keys())
    identity = identity_of(single)
    assert identity.prediction == "v"
    assert identity.facts["zero_terminal_snr"] == "marker key `ztsnr`"
    back = tmp_path / "back"
    convert_model(single, back, ConvertOptions(to="diffusers", config_dir=str(TOY_SDXL)))
    scheduler = json.loads((back / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True


def test_an_epsilon_model_gets_no_markers(tmp_path: Path) -> None:
    if not TOY_SDXL.is_dir():
        pytest.skip("toy fixtures not built (fixtures/toy/build.py)")
    single = tmp_path / "eps.safetensors"
    convert_model(TOY_SDXL, single, ConvertOptions(to="single-file"))
    with safe_open(single, "pt") as handle:
        assert not {"v_pred", "ztsnr"} & set(handle.keys())
    assert "zero_terminal_snr" not in identity_of(single).facts
