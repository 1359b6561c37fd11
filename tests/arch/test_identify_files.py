"""identify() on files and folders written to disk by the peers and opened with open_model."""

from __future__ import annotations

import json

import torch
from arch_models import pipeline_parts, tiny_clip, tiny_unet
from safetensors.torch import save_file

from sdkit.arch import identify
from sdkit.io import open_model


def _save_pipeline(folder, family: str, scheduler) -> None:
    modules, index = pipeline_parts(family)
    for name, module in modules.items():
        module.save_pretrained(folder / name)
    scheduler.save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))


def test_pipeline_folder_with_v_prediction_scheduler(tmp_path):
    from diffusers import DDIMScheduler

    _save_pipeline(tmp_path, "sd1", DDIMScheduler(prediction_type="v_prediction"))
    with open_model(tmp_path) as model:
        identity = identify(model)
    assert (identity.kind, identity.family, identity.key_convention) == ("checkpoint", "sd1", "diffusers")
    assert (identity.prediction, identity.prediction_evidence) == ("v", "scheduler config prediction_type")
    assert identity.components == ["unet", "vae", "text_encoder"]
    assert identity.facts["pipeline_class"] == "StableDiffusionPipeline"
    assert set(identity.precision.components) == {"unet", "vae", "text_encoder"}


def test_sdxl_pipeline_folder(tmp_path):
    from diffusers import EulerDiscreteScheduler

    _save_pipeline(tmp_path, "sdxl", EulerDiscreteScheduler())
    with open_model(tmp_path) as model:
        identity = identify(model)
    assert (identity.family, identity.prediction) == ("sdxl-base", "epsilon")
    assert identity.components == ["unet", "vae", "text_encoder", "text_encoder_2"]


def test_lone_component_folders_use_their_config(tmp_path):
    tiny_unet("refiner").save_pretrained(tmp_path / "my_refiner_unet")
    with open_model(tmp_path / "my_refiner_unet") as model:
        identity = identify(model)
    assert (identity.kind, identity.family, identity.key_convention) == ("unet", "sdxl-refiner", "diffusers")
    tiny_clip("gelu").save_pretrained(tmp_path / "sd2_text_encoder")
    with open_model(tmp_path / "sd2_text_encoder") as model:
        identity = identify(model)
    assert (identity.kind, identity.family) == ("text-encoder", "sd2")


def test_ldm_safetensors_file(tmp_path, ldm_checkpoint):
    tensors = {k: t.half().contiguous() for k, t in ldm_checkpoint("sdxl").items()}
    save_file(tensors, tmp_path / "tiny_xl.safetensors",
              metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base",
                        "modelspec.title": "tiny xl"})
    with open_model(tmp_path / "tiny_xl.safetensors") as model:
        identity = identify(model, deep=True)
    assert (identity.kind, identity.family, identity.key_convention) == ("checkpoint", "sdxl-base", "ldm")
    assert identity.precision.dominant == "F16" and identity.facts["nan_tensors"] == []


def test_lightning_ckpt_with_ema_and_global_step(tmp_path, ldm_checkpoint):
    state = ldm_checkpoint("sd1")
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1000)
    state["model_ema.diffusion_modelout2weight"] = state["model.diffusion_model.out.2.weight"].clone()
    torch.save({"state_dict": state, "global_step": 875000, "epoch": 3}, tmp_path / "tiny.ckpt")
    with open_model(tmp_path / "tiny.ckpt") as model:
        identity = identify(model)
    assert (identity.kind, identity.family) == ("checkpoint", "sd1")
    assert identity.facts["global_step"] == 875000
    assert identity.facts["ema_tensors"] == 1
