"""`sdkit vae check` on the toy models: their own VAEs match, a decoder-only fine-tune
matches, a VAE trained separately (toy-sdxl's, same shapes) is another latent space, and
a VAE of another shape cannot be used at all."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from sdkit.arch import FAMILIES
from sdkit.arch.keymaps import convert_state_dict, plan_for
from sdkit.cli import vae_cmd  # noqa: F401  (attaches `vae` to the group)
from sdkit.cli.main import cli
from sdkit.errors import SdkitError
from sdkit.runtime import vae_table
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.toyscore import LIGHT_BACKGROUNDS, random_scene, render_scene
from sdkit.runtime.vae_check import THRESHOLDS, check_vae

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy"
SD1 = TOY / "sd1" / "diffusers"
SDXL = TOY / "sdxl" / "diffusers"

pytestmark = pytest.mark.skipif(not (SD1 / "model_index.json").is_file() or not SDXL.is_dir(),
                                reason="toy models not built (make fixtures)")


def check(base: Path, vae: Path, **options: Any) -> dict[str, Any]:
    return check_vae(base, vae, **options).to_json()


def write_ldm_vae(vae: AutoencoderKL, path: Path) -> Path:
    config = json.loads(json.dumps(dict(vae.config), default=str))
    state = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    save_file(convert_state_dict(plan_for("vae", config, state, "diffusers_to_ldm"), state), path)
    return path


def toy_pictures(count: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    pixels = np.stack([np.asarray(render_scene(random_scene(rng, LIGHT_BACKGROUNDS))) for _ in range(count)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def decoder_finetune(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """toy-sd1's VAE with only its decoder trained further on toy pictures (as sd-vae-ft-mse
    was made from SD's VAE)."""
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(SD1 / "vae", local_files_only=True)
    pictures = toy_pictures(32, seed=5)
    with torch.no_grad():
        latents = vae.encode(pictures).latent_dist.mean
    decoder = [p for n, p in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))]
    optimizer = torch.optim.Adam(decoder, lr=1e-3)
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(vae.decode(latents).sample, pictures)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return write_ldm_vae(vae, tmp_path_factory.mktemp("ft") / "toy-ft-decoder.vae.safetensors")


@pytest.fixture(scope="module", params=["diffusers folder", "single file"])
def base_without_vae(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """toy-sd1 without its VAE: the folder without vae/, the single file without first_stage_model.*"""
    if request.param == "single file":
        tensors = load_file(TOY / "sd1" / "toy-sd1.safetensors")
        path = tmp_path_factory.mktemp("novae") / "toy-sd1-novae.safetensors"
        save_file({k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")}, path)
        return path
    folder = tmp_path_factory.mktemp("novae") / "toy-sd1-novae"
    shutil.copytree(SD1, folder, ignore=shutil.ignore_patterns("vae"))
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("vae")
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("vae", [TOY / "sd1" / "vae", TOY / "sd1" / "toy-sd1.vae.safetensors"],
                         ids=["diffusers folder", "a1111 file"])
def test_own_vae_matches(vae: Path) -> None:
    report = check(SD1, vae)
    assert report["verdict"] == "match", report["reasons"]
    assert report["denoising"]["ratio"] == pytest.approx(1.0, abs=0.02)
    assert report["latents"]["cosine"] > 0.999
    assert abs(report["reconstruction"]["cross_loss_db"]) < 0.5
    assert report["fp16"]["status"] == "ok"
    assert report["scaling"]["factor"] == json.loads((SD1 / "vae" / "config.json").read_text())["scaling_factor"]


def test_decoder_only_finetune_matches(decoder_finetune: Path) -> None:
    tuned, original = load_file(decoder_finetune), load_file(TOY / "sd1" / "toy-sd1.vae.safetensors")
    assert any(not torch.equal(tuned[k], original[k].float()) for k in tuned if k.startswith("decoder."))
    report = check(SD1, decoder_finetune)
    assert report["verdict"] == "match", report["reasons"]
    assert report["denoising"]["ratio"] == pytest.approx(1.0, abs=0.02)


def test_separately_trained_vae_of_the_same_shape_mismatches() -> None:
    report = check(SD1, SDXL / "vae")
    assert report["architecture"]["fits"]
    assert report["verdict"] == "mismatch"
    assert report["denoising"]["ratio"] > THRESHOLDS["max_denoise_ratio"]
    assert report["latents"]["cosine"] < THRESHOLDS["min_latent_cosine"]
    assert any("noise error on its latents" in reason for reason in report["reasons"])


def test_sdxl_base_takes_its_own_vae_not_sd1s() -> None:
    assert check(SDXL, SDXL / "vae")["verdict"] == "match"
    assert check(SDXL, TOY / "sd1" / "vae")["verdict"] == "mismatch"


def test_single_file_base_with_config() -> None:
    report = check(TOY / "sd1" / "toy-sd1.safetensors", TOY / "sd1" / "toy-sd1.vae.safetensors", config=SD1)
    assert report["verdict"] == "match", report["reasons"]
    assert report["denoising"]["ratio"] == pytest.approx(1.0, abs=0.02)


def test_base_without_vae_scores_against_the_oracle(base_without_vae: Path, decoder_finetune: Path) -> None:
    own = check(base_without_vae, TOY / "sd1" / "toy-sd1.vae.safetensors", config=SD1)
    other = check(base_without_vae, SDXL / "vae", config=SD1)
    assert own["base"]["has_vae"] is False and "ratio" not in own["denoising"]
    assert own["verdict"] == "match" and own["denoising"]["candidate_score"] < THRESHOLDS["max_denoise_score"]
    assert other["verdict"] == "mismatch" and other["denoising"]["candidate_score"] > THRESHOLDS["max_denoise_score"]
    assert check(base_without_vae, decoder_finetune, config=SD1)["verdict"] == "match"


def test_loader_takes_a_base_without_vae_only_when_asked(base_without_vae: Path) -> None:
    with pytest.raises(SdkitError, match="vae"):
        load_model(base_without_vae, config=SD1, device="cpu", dtype="fp32")
    loaded = load_model(base_without_vae, config=SD1, device="cpu", dtype="fp32", require_vae=False)
    assert loaded.pipe.vae is None and loaded.pipe.unet is not None and loaded.pipe.text_encoder is not None
    with pytest.raises(SdkitError, match="has no VAE"):
        load_model(base_without_vae, config=SD1, vae=SD1 / "vae", device="cpu", require_vae=False)


@pytest.mark.parametrize("changes, problem", [
    ({"latent_channels": 8}, "8 latent channels, the base's UNet works on 4"),
    ({"block_out_channels": (16, 32, 48)}, "shaped differently from the base's VAE"),
])
def test_vae_of_another_shape_is_incompatible(tmp_path: Path, changes: dict[str, Any], problem: str) -> None:
    config = {**AutoencoderKL.load_config(SD1 / "vae"), **changes}
    vae = write_ldm_vae(AutoencoderKL.from_config(config), tmp_path / "other.vae.safetensors")
    report = check(SD1, vae)
    assert report["verdict"] == "incompatible"
    assert any(problem in reason for reason in report["reasons"])
    assert report["denoising"] is None and report["fp16"]["status"] == "not tested"


def test_fp16_overflow_is_reported(tmp_path: Path) -> None:
    vae = AutoencoderKL.from_pretrained(SD1 / "vae", local_files_only=True)
    with torch.no_grad():  # activations past float16's range, as in SDXL's original VAE
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
    fp16 = check(SD1, write_ldm_vae(vae, tmp_path / "hot.vae.safetensors"))["fp16"]
    assert fp16["status"] == "nan" and fp16["decode_finite"] is False
    assert fp16["peak_activation_fp32"] > fp16["fp16_max"]
    assert "float32" in fp16["advice"]



def test_fp16_that_cannot_run_is_reported_as_not_tested(monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(module: torch.nn.Module) -> torch.nn.Module:
        raise RuntimeError("\"slow_conv2d_cpu\" not implemented for 'Half'")

    monkeypatch.setattr(torch.nn.Module, "half", unsupported)
    report = check(SD1, TOY / "sd1" / "vae")
    assert report["verdict"] == "match"
    assert report["fp16"]["status"] == "not tested" and "float16 does not run here" in report["fp16"]["reason"]

@pytest.mark.parametrize("vae, hashed", [
    (TOY / "sd1" / "toy-sd1.vae.safetensors", TOY / "sd1" / "toy-sd1.vae.safetensors"),
    (TOY / "sd1" / "vae", TOY / "sd1" / "vae" / "diffusion_pytorch_model.safetensors"),
], ids=["file", "folder weights"])
def test_known_vae_is_named(monkeypatch: pytest.MonkeyPatch, vae: Path, hashed: Path) -> None:
    sha256 = hashlib.sha256(hashed.read_bytes()).hexdigest()
    entry = vae_table.KnownVae(sha256, "toy vae", "sd1", "test entry", "this test")
    monkeypatch.setitem(vae_table.KNOWN_VAES, sha256, entry)
    candidate = check(SD1, vae, fp16=False)["candidate"]
    assert candidate["sha256"] == sha256 and candidate["known"]["name"] == "toy vae"


def test_known_vae_table_is_well_formed() -> None:
    for sha256, entry in vae_table.KNOWN_VAES.items():
        assert sha256 == entry.sha256 and len(sha256) == 64 and int(sha256, 16) >= 0 and sha256 == sha256.lower()
        assert entry.family in FAMILIES and entry.source
    mse = "735e4c3a447a3255760d7f86845f09f937809baa529c17370d83e4c3758f3c75"
    assert vae_table.known_vae(mse.upper()).name == "vae-ft-mse-840000-ema-pruned.safetensors"
    assert vae_table.known_vae("0" * 64) is None


def test_cli_json_report_and_exit_code() -> None:
    vae = TOY / "sd1" / "toy-sd1.vae.safetensors"
    result = CliRunner().invoke(cli, ["vae", "check", str(SD1), str(vae), "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert {"verdict", "reasons", "base", "candidate", "architecture", "scaling", "latents", "denoising",
            "reconstruction", "fp16", "thresholds"} <= set(report)
    assert report["verdict"] == "match"
    assert report["candidate"]["sha256"] == hashlib.sha256(vae.read_bytes()).hexdigest()
    result = CliRunner().invoke(cli, ["vae", "check", str(SD1), str(SDXL / "vae"), "--json", "--no-fp16"])
    assert result.exit_code == 1
    assert json.loads(result.output)["verdict"] == "mismatch"
