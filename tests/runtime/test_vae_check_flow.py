"""`sdkit vae check` measures the latent space of a FLUX.1 base (toy-flux): its own VAE
matches, the same VAE with its latent channels reordered or rescaled (same shapes, same
round trip, another latent space) does not, from the diffusers folder and from the split
parts ComfyUI users keep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from sdkit.cli import vae_cmd  # noqa: F401  (attaches `vae` to the group)
from sdkit.cli.main import cli
from sdkit.errors import SdkitError
from sdkit.runtime.vae_check import THRESHOLDS, check_vae
from sdkit.runtime.vae_check_flow import _oracle_errors

FLUX = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "flux"
FOLDER = FLUX / "diffusers"
AE = FLUX / "ae.safetensors"
PARTS = {"text_encoders": (FLUX / "toy-flux.clip_l.safetensors", FLUX / "toy-flux.t5xxl.safetensors"),
         "config": FOLDER}

pytestmark = pytest.mark.skipif(not (FOLDER / "model_index.json").is_file(), reason="toy-flux not built")


def _other_space(path: Path, channel_order: torch.Tensor, gain: float) -> Path:
    """toy-flux's VAE with latent channel c written as gain * channel_order[c]: the encoder's
    mean rows (and log-variance rows) and the decoder's input columns moved together, so
    pictures round-trip exactly as before while the latents change."""
    tensors = load_file(AE)
    channels = len(channel_order)
    rows = torch.cat([channel_order, channel_order + channels])
    weight, bias = tensors["encoder.conv_out.weight"][rows], tensors["encoder.conv_out.bias"][rows]
    weight[:channels] *= gain
    bias[:channels] *= gain
    bias[channels:] += 2 * torch.log(torch.tensor(gain))
    tensors["encoder.conv_out.weight"], tensors["encoder.conv_out.bias"] = weight.contiguous(), bias.contiguous()
    tensors["decoder.conv_in.weight"] = (tensors["decoder.conv_in.weight"][:, channel_order] / gain).contiguous()
    save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def reordered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _other_space(tmp_path_factory.mktemp("vae") / "reordered.safetensors", torch.arange(15, -1, -1), 1.0)


@pytest.fixture(scope="module")
def rescaled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _other_space(tmp_path_factory.mktemp("vae") / "rescaled.safetensors", torch.arange(16), 2.0)


def test_own_vae_matches_the_folder() -> None:
    report = check_vae(FOLDER, AE).to_json()
    assert report["verdict"] == "match", report["reasons"]
    assert report["denoising"]["ratio"] == pytest.approx(1.0, abs=0.01)  # fp16 file, fp32 folder
    assert report["latents"]["cosine"] > 0.999
    assert report["scaling"]["shift"] == pytest.approx(json.loads((FOLDER / "vae" / "config.json").read_text())
                                                       ["shift_factor"])


@pytest.mark.parametrize("name", ["reordered", "rescaled"])
def test_same_shapes_in_another_latent_space_mismatch(name: str, request: pytest.FixtureRequest) -> None:
    vae = request.getfixturevalue(name)
    report = check_vae(FOLDER, vae).to_json()
    assert report["architecture"]["fits"]  # the headers cannot tell
    assert report["verdict"] == "mismatch"
    assert report["denoising"]["ratio"] > THRESHOLDS["max_denoise_ratio"]
    # its decoder reads its own latents as well as the base's VAE reads the base's
    assert report["reconstruction"]["candidate_psnr"] == pytest.approx(report["reconstruction"]["base_psnr"], abs=0.05)
    assert any("velocity error" in reason for reason in report["reasons"])


def test_split_parts_score_against_the_oracle(reordered: Path) -> None:
    base = FLUX / "toy-flux.safetensors"
    own = check_vae(base, AE, **PARTS).to_json()
    other = check_vae(base, reordered, **PARTS).to_json()
    assert own["verdict"] == "match" and "ratio" not in own["denoising"]
    assert own["denoising"]["candidate_score"] <= THRESHOLDS["max_denoise_score"]
    assert other["verdict"] == "mismatch"
    assert other["denoising"]["candidate_score"] > 2 * own["denoising"]["candidate_score"]


def test_lone_diffusion_model_without_encoders_gets_the_header_verdict_and_a_hint(reordered: Path) -> None:
    report = check_vae(FLUX / "toy-flux.safetensors", reordered)
    assert report.verdict == "match" and report.denoising is None
    assert any("--text-encoder" in reason for reason in report.reasons)


def test_lone_diffusion_model_without_configs_is_refused_in_one_line() -> None:
    with pytest.raises(SdkitError, match="--config"):
        check_vae(FLUX / "toy-flux.safetensors", AE, text_encoders=PARTS["text_encoders"])


def test_oracle_is_the_best_linear_velocity_estimate() -> None:
    """The closed form against a least-squares fit of velocity on the noisy latent, per channel."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4000, 2, 1, 1, generator=generator) * torch.tensor([0.5, 1.7]).view(1, 2, 1, 1) + 0.3
    for sigma in (0.2, 0.7):
        noise = torch.randn(latents.shape, generator=generator)
        noisy = (1 - sigma) * latents + sigma * noise
        target = noise - latents
        errors = []
        for channel in range(2):
            x, y = noisy[:, channel].flatten(), target[:, channel].flatten()
            design = torch.stack([x, torch.ones_like(x)], dim=1)
            solution = torch.linalg.lstsq(design, y.unsqueeze(1)).solution
            errors.append(float(((design @ solution).squeeze(1) - y).pow(2).mean()))
        assert _oracle_errors(latents, [sigma])[0] == pytest.approx(sum(errors) / 2, rel=0.03)


def test_cli_takes_text_encoder_files(reordered: Path) -> None:
    base = FLUX / "toy-flux.safetensors"
    encoders = [arg for path in PARTS["text_encoders"] for arg in ("--text-encoder", str(path))]
    result = CliRunner().invoke(cli, ["vae", "check", str(base), str(reordered), *encoders, "--config", str(FOLDER),
                                      "--json", "--no-fp16"])
    assert result.exit_code == 1, result.output
    assert json.loads(result.output)["verdict"] == "mismatch"
