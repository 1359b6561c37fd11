"""LoRA-family adapters at sampling time: the same as baking them, as diffusers' own
LoRA loading, undone exactly, refused for other families."""

from __future__ import annotations

import shutil

import pytest
import torch

from runtime_models import (draw, kohya_lora_tensors, ldm_kohya_lora, max_difference, pixels, tiny_settings,
                            write_adapter)
from sdkit.errors import SdkitError
from sdkit.ops.lora.bake import AdapterInput, BakeOptions, bake_loras
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample.sampler import Sampler
from sdkit.runtime.sample.plan import AdapterArgs, resolve_adapters


def _baked(model_file, lora, strength, tmp_path, components="all"):
    """The model baked with `lora` by sdkit.ops.lora.bake, loaded the way the base is."""
    out = tmp_path / f"baked-{strength}-{components}.safetensors"
    bake_loras(model_file, [AdapterInput(str(lora), strength)], out, BakeOptions(components=components))
    shutil.copytree(model_file.with_name(model_file.name + ".tokenizer"), out.with_name(out.name + ".tokenizer"))
    return load_model(out)


@pytest.fixture(scope="module")
def sd1_lora(sd1, tmp_path_factory):
    pipe = load_model(sd1.folder).pipe
    return write_adapter(tmp_path_factory.mktemp("lora") / "style.safetensors", kohya_lora_tensors(pipe, seed=5))


@pytest.mark.parametrize("algorithm, strength", [("lora", 0.7), ("loha", 1.0)])
def test_runtime_adapter_draws_what_the_baked_checkpoint_draws(sd1, tmp_path, algorithm, strength):
    pipe = load_model(sd1.folder).pipe
    lora = write_adapter(tmp_path / f"{algorithm}.safetensors", kohya_lora_tensors(pipe, seed=6, algorithm=algorithm))
    model = load_model(sd1.file)
    sampler = Sampler(model, adapters=resolve_adapters(AdapterArgs(loras=[f"{lora}:{strength}"]), None))
    ours = sampler.generate(sampler.plan_prompt("a photo"), tiny_settings(seed=2))
    baked = _baked(sd1.file, lora, strength, tmp_path)
    # weights: the same bits as the baked file's
    for component in ("unet", "text_encoder"):
        mine, theirs = getattr(model.pipe, component).state_dict(), getattr(baked.pipe, component).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), component
    reference = draw(baked, "a photo", seed=2)[0]
    assert max_difference(pixels(ours[0].image), reference) == 0
    assert max_difference(reference, draw(load_model(sd1.file), "a photo", seed=2)[0]) > 10
    sampler.close()


def test_separate_text_encoder_and_unet_strengths_match_a_unet_only_bake(sd1, sd1_lora, tmp_path):
    library = tmp_path / "webui"
    (library / "models" / "Lora").mkdir(parents=True)
    shutil.copyfile(sd1_lora, library / "models" / "Lora" / "style.safetensors")
    from sdkit.runtime.sample.library import Library

    ours = draw(load_model(sd1.file), "a photo <lora:style:0:0.8>", library=Library(library))[0]
    unet_only = _baked(sd1.file, sd1_lora, 0.8, tmp_path, components="unet")
    assert max_difference(ours, draw(unet_only, "a photo")[0]) == 0


def test_runtime_lora_matches_diffusers_own_lora_loading(sd1, sd1_lora):
    from diffusers import StableDiffusionPipeline

    from sdkit.runtime.sample.scheduler import make_scheduler

    peer = StableDiffusionPipeline.from_pretrained(sd1.folder, local_files_only=True)
    peer.set_progress_bar_config(disable=True)
    peer.load_lora_weights(str(sd1_lora), adapter_name="style")
    peer.set_adapters(["style"], adapter_weights=[0.6])
    peer.scheduler = make_scheduler("euler", dict(peer.scheduler.config))
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn((1, 4, 16, 16), generator=generator)
    with torch.no_grad():
        theirs = peer("a photo", negative_prompt="", num_inference_steps=4, guidance_scale=6.0, width=32,
                      height=32, latents=latents, generator=generator).images[0]
    ours = draw(load_model(sd1.file), "a photo", seed=4, scheduler="euler",
                adapters=AdapterArgs(loras=[f"{sd1_lora}:0.6"]))[0]
    assert max_difference(ours, pixels(theirs)) <= 2


def test_sdxl_lora_named_after_ldm_paths_matches_the_bake(sdxl, tmp_path):
    tensors = ldm_kohya_lora(sdxl.file, sdxl.folder, seed=8)
    lora = write_adapter(tmp_path / "xl.safetensors", tensors, {"ss_base_model_version": "sdxl_base_v1-0"})
    model = load_model(sdxl.file)
    sampler = Sampler(model, adapters=resolve_adapters(AdapterArgs(loras=[f"{lora}:0.9"]), None))
    ours = sampler.generate(sampler.plan_prompt("a photo"), tiny_settings(seed=2))[0]
    reports = sampler.applied_loras()
    modules = sum(key.endswith(".alpha") for key in tensors)
    assert reports[0].mapped == modules and not reports[0].unmapped
    assert max_difference(pixels(ours.image), draw(_baked(sdxl.file, lora, 0.9, tmp_path), "a photo", seed=2)[0]) == 0
    sampler.close()


def test_strength_zero_and_restore_leave_the_model_as_loaded(sd1, sd1_lora):
    model = load_model(sd1.file)
    before = {k: v.clone() for k, v in model.pipe.unet.state_dict().items()}
    plain = draw(model, "a photo")[0]
    assert max_difference(draw(model, "a photo", adapters=AdapterArgs(loras=[f"{sd1_lora}:0"]))[0], plain) == 0
    changed = draw(model, "a photo", adapters=AdapterArgs(loras=[f"{sd1_lora}:1"]))[0]
    assert max_difference(changed, plain) > 10
    after = model.pipe.unet.state_dict()  # draw() closes its sampler, which restores
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert max_difference(draw(model, "a photo")[0], plain) == 0


def test_a_lora_made_for_another_family_is_refused_in_one_line(sd1, sdxl, tmp_path):
    lora = write_adapter(tmp_path / "xl.safetensors", ldm_kohya_lora(sdxl.file, sdxl.folder, seed=8),
                         {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(SdkitError, match="made for sdxl-base") as caught:
        draw(load_model(sd1.file), "a photo", adapters=AdapterArgs(loras=[str(lora)]))
    assert "\n" not in str(caught.value) and str(lora) in str(caught.value)


def test_a_lora_none_of_whose_modules_fit_is_refused(sd1, tmp_path):
    lora = write_adapter(tmp_path / "odd.safetensors", {
        "lora_unet_nowhere_to_q.lora_down.weight": torch.ones(2, 7),
        "lora_unet_nowhere_to_q.lora_up.weight": torch.ones(7, 2)})
    with pytest.raises(SdkitError, match="none of its 1 modules fits") as caught:
        draw(load_model(sd1.file), "a photo", adapters=AdapterArgs(loras=[str(lora)]))
    assert "\n" not in str(caught.value)
