"""FLUX.1 training pieces: noise levels and targets as diffusers' `train_dreambooth_lora_flux.py`
and kohya's `flux_train_utils.get_noisy_model_input_and_timesteps` compute them, and the
options a FLUX.1 base does not train with refused in one line before anything loads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from cli_run import run_sdkit

from sdkit.runtime.toyscore import write_concept_pictures
from sdkit.runtime.train.config import LossOptions
from sdkit.runtime.train.flow import FlowObjective

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy"
FLUX, SD1 = TOY / "flux" / "diffusers", TOY / "sd1" / "toy-sd1.safetensors"
SCHNELL = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
SHIFTED = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


def _script_sigmas(config: dict, scheme: str, batch: int, seed: int) -> torch.Tensor:
    """diffusers' trainer: u from the density, an index into the scheduler's timesteps, the
    sigma of that timestep."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    u = compute_density_for_timestep_sampling(scheme, batch, logit_mean=0.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(seed))
    timesteps = scheduler.timesteps[(u * 1000).long()]
    return torch.stack([scheduler.sigmas[(scheduler.timesteps == t).nonzero().item()] for t in timesteps])


@pytest.mark.parametrize("config", [SCHNELL, SHIFTED], ids=["schnell", "shift-3"])
@pytest.mark.parametrize("sampling, scheme", [("uniform", "none"), ("logit-normal", "logit_normal")])
def test_noise_levels_are_the_diffusers_scripts(config, sampling, scheme):
    objective = FlowObjective(config, LossOptions(timestep_sampling=sampling))
    ours = objective.sigmas(64, torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, _script_sigmas(config, scheme, 64, 7), rtol=0, atol=0)


def test_uniform_schnell_levels_are_the_thousand_steps():
    ours = FlowObjective(SCHNELL, LossOptions()).sigmas(4096, torch.Generator().manual_seed(0))
    steps = torch.round(ours * 1000)
    assert torch.allclose(ours * 1000, steps, atol=1e-3) and steps.min() >= 1 and steps.max() <= 1000
    assert abs(float(ours.mean()) - 0.5) < 0.02  # uniform on (0, 1]


def test_shift_sampling_is_kohyas():
    """kohya: sigmas = sigmoid(randn); sigmas = sigmas * shift / (1 + (shift - 1) * sigmas)."""
    objective = FlowObjective(SCHNELL, LossOptions(timestep_sampling="shift", flow_shift=3.1582))
    ours = objective.sigmas(16, torch.Generator().manual_seed(3))
    drawn = torch.randn(16, generator=torch.Generator().manual_seed(3))
    expected = [1 / (1 + math.exp(-float(x))) for x in drawn]
    expected = torch.tensor([s * 3.1582 / (1 + 2.1582 * s) for s in expected])
    torch.testing.assert_close(ours, expected)


def test_noisy_latents_and_target_are_rectified_flow():
    objective = FlowObjective(SCHNELL, LossOptions())
    latents = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    batch = objective.noisy_batch(latents, torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(latents.shape, generator=generator)
    sigma = objective.sigmas(3, generator).view(3, 1, 1, 1)
    torch.testing.assert_close(batch.noisy, (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(batch.target, noise - latents)
    torch.testing.assert_close(batch.timesteps, sigma.flatten())
    loss = objective.loss(batch.target + 0.5, batch)
    torch.testing.assert_close(loss, torch.full((3,), 0.25))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    return write_concept_pictures(tmp_path_factory.mktemp("data"), "red", "square", "a photo of sks", count=2)


@pytest.mark.parametrize("base, options, message", [
    (FLUX, ["ti"], "FLUX.1 bases train lora and lokr, not ti"),
    (FLUX.parent / "toy-flux.safetensors", ["lora"], "diffusion model (FLUX.1-schnell design, non-standard dimensions); it runs with CLIP-L, T5-XXL, FLUX VAE"),
    (FLUX, ["lora", "--noise-offset", "0.1"], "--noise-offset does not apply to FLUX.1 bases"),
    (FLUX, ["lora", "--min-snr-gamma", "5"], "--min-snr-gamma does not apply to FLUX.1 bases"),
    (FLUX, ["lora", "--prediction-type", "epsilon"], "--prediction-type does not apply to FLUX.1 bases"),
    (FLUX, ["lokr", "--train-text-encoder"], "--train-text-encoder does not apply to FLUX.1 bases"),
    (FLUX, ["lora", "--preview-every", "5", "--preview-prompt", "x"], "--preview-every does not apply"),
    (FLUX, ["lokr", "--layout", "diffusers"], "--layout diffusers holds plain LoRA modules"),
    (FLUX, ["lora", "--flow-shift", "2"], "--flow-shift shifts --timestep-sampling shift"),
    (SD1, ["lora", "--timestep-sampling", "shift"], "--timestep-sampling applies to flow-matching bases"),
    (SD1, ["lora", "--text-encoder", str(FLUX.parent / "toy-flux.clip_l.safetensors")],
     "--text-encoder gives a FLUX.1 diffusion model alone its text encoders"),
    (FLUX, ["ti", "--vae", str(FLUX.parent / "ae.safetensors")], "--vae does not apply to ti"),
    (SD1, ["lora", "--vae", str(FLUX.parent / "ae.safetensors")], "--vae gives a FLUX.1 diffusion model alone its VAE"),
])
def test_options_a_base_does_not_train_with_are_refused_in_one_line(capsys, pictures, tmp_path, base, options,
                                                                     message):
    if not base.exists():
        pytest.skip("toy models not built (make fixtures)")
    method, *rest = options
    output = tmp_path / ("out.pt" if method == "hypernet" else "out.safetensors")
    code, _, err = run_sdkit(capsys, "train", method, "--base", str(base), "--data", str(pictures),
                               "-o", str(output), *rest)
    assert code == 1 and message in err, err
    assert err.count("\n") == 1 and err.startswith("sdkit: error: ")
    assert not output.exists() and not list(tmp_path.iterdir())


def test_sd_lora_in_diffusers_layout_holds_the_kohya_files_deltas_and_loads_in_diffusers(pictures, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from sdkit.runtime.train import DataOptions, NetworkOptions, OptimOptions, RunOptions, TrainConfig, train

    if not SD1.exists():
        pytest.skip("toy models not built (make fixtures)")
    folder = SD1.parent / "diffusers"
    files = {}
    for layout in ("kohya", "diffusers"):
        files[layout] = tmp_path / f"{layout}.safetensors"
        train(TrainConfig("lora", SD1, files[layout], DataOptions(pictures), config_dir=folder,
                          optim=OptimOptions(steps=3, lr=1e-2), network=NetworkOptions(rank=2, alpha=1.0, layout=layout),
                          run=RunOptions(seed=3)))
    kohya_name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    peft_name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    with safe_open(files["kohya"], "pt") as kohya, safe_open(files["diffusers"], "pt") as peft:
        scale = kohya.get_tensor(f"{kohya_name}.alpha").item() / 2
        theirs = scale * kohya.get_tensor(f"{kohya_name}.lora_up.weight") @ kohya.get_tensor(
            f"{kohya_name}.lora_down.weight")
        ours = peft.get_tensor(f"{peft_name}.lora_B.weight") @ peft.get_tensor(f"{peft_name}.lora_A.weight")
        assert peft.metadata()["ss_network_dim"] == "2"
    assert theirs.abs().max() > 0
    torch.testing.assert_close(ours, theirs)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    original = layer.weight.detach().clone()
    pipe.load_lora_weights(str(files["diffusers"]))
    pipe.fuse_lora()
    torch.testing.assert_close(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.base_layer.weight
                               - original, ours)
