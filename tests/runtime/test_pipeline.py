"""Loading models for sampling: both file forms, offline tokenizers, other VAEs, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime_models import draw, max_difference
from sdkit.arch.keymaps import convert_state_dict, plan_for
from sdkit.errors import SdkitError
from sdkit.runtime.pipeline import load_model


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_and_diffusers_folder_draw_the_same_picture(request, family):
    model = request.getfixturevalue(family)
    from_folder = load_model(model.folder)
    from_file = load_model(model.file)
    assert from_folder.family == from_file.family == model.family
    assert from_file.layout == family
    # a single file infers its configs from the weights; they must rebuild the same model
    assert max_difference(draw(from_folder, "a photo")[0], draw(from_file, "a photo")[0]) == 0


def test_loaded_weights_equal_the_folder_weights_exactly(sd1):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(sd1.folder, local_files_only=True)
    loaded = load_model(sd1.file).pipe
    for component in ("unet", "vae", "text_encoder"):
        ours = getattr(loaded, component).state_dict()
        theirs = getattr(reference, component).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), component


def test_single_file_draws_as_the_diffusers_pipeline_of_the_folder(sd1):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(sd1.folder, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn((1, 4, 16, 16), generator=generator)
    with torch.no_grad():
        theirs = reference("a photo", negative_prompt="", num_inference_steps=4, guidance_scale=6.0,
                           width=32, height=32, latents=latents, generator=generator, output_type="pil").images[0]
    ours = draw(load_model(sd1.file), "a photo", scheduler="euler")[0]
    assert max_difference(ours, np.asarray(theirs, dtype=np.int16)) <= 1


def test_a_single_file_without_tokenizer_asks_for_config(sd1, tmp_path):
    lone = tmp_path / "lone.safetensors"
    shutil.copyfile(sd1.file, lone)
    with pytest.raises(SdkitError, match="--config") as caught:
        load_model(lone)
    assert "\n" not in str(caught.value)
    # with --config the folder's tokenizer (and configs) are used
    assert load_model(lone, config=sd1.folder).pipe.tokenizer is not None


def _vae_file(folder, path, scale: float = 1.0):
    config = json.loads((folder / "vae" / "config.json").read_text())
    tensors = load_file(next((folder / "vae").glob("*.safetensors")))
    ldm = convert_state_dict(plan_for("vae", config, tensors, "diffusers_to_ldm"), tensors)
    save_file({k: (v * scale if k.startswith("decoder.conv_out") else v).contiguous()
               for k, v in ldm.items()}, str(path))
    return path


def test_another_vae_replaces_the_models_own(sd1, tmp_path):
    same = _vae_file(sd1.folder, tmp_path / "same.vae.safetensors")
    other = _vae_file(sd1.folder, tmp_path / "other.vae.safetensors", scale=0.5)
    plain = draw(load_model(sd1.file), "a photo")[0]
    assert max_difference(draw(load_model(sd1.file, vae=same), "a photo")[0], plain) == 0
    with_other = load_model(sd1.file, vae=other)
    assert with_other.vae_path == other and with_other.file_hash("vae") is not None
    assert max_difference(draw(with_other, "a photo")[0], plain) > 10


def test_a_vae_that_does_not_fit_is_refused_in_one_line(sd1, sdxl, tmp_path):
    from diffusers import AutoencoderKL

    narrow = AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32,
                           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    narrow.save_pretrained(tmp_path / "narrow-vae")
    for vae, expected in ((tmp_path / "narrow-vae", "not a VAE for this model"),
                          (sdxl.folder / "text_encoder", "not a VAE")):
        with pytest.raises(SdkitError, match=expected) as caught:
            load_model(sd1.file, vae=vae)
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("what", ["missing", "lora"])
def test_what_is_not_a_model_is_refused_in_one_line(sd1, tmp_path, what):
    if what == "missing":
        path, expected = tmp_path / "nope.safetensors", "no such file"
    else:
        path, expected = tmp_path / "x.safetensors", "is a lora"
        save_file({"lora_unet_a_b.lora_down.weight": torch.zeros(2, 4),
                   "lora_unet_a_b.lora_up.weight": torch.zeros(4, 2)}, str(path))
    with pytest.raises(SdkitError, match=expected) as caught:
        load_model(path)
    assert "\n" not in str(caught.value)


def test_model_hash_is_the_autov2_of_the_file(sd1):
    import hashlib

    expected = hashlib.sha256(sd1.file.read_bytes()).hexdigest()[:10]
    assert load_model(sd1.file).file_hash("model") == expected
    assert load_model(sd1.folder).file_hash("model") is None  # a folder has no file hash


def test_dtype_and_device_choices(sd1):
    model = load_model(sd1.file, device="cpu", dtype="bf16")
    assert model.pipe.unet.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert load_model(sd1.file, dtype="auto").dtype == torch.float32  # auto on CPU
    with pytest.raises(SdkitError, match="dtype"):
        load_model(sd1.file, dtype="fp8")
