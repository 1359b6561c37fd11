"""toy-flux drawn through `sdkit sample`: the picture shows the colour and shape asked for,
it is the picture diffusers' FluxPipeline draws, and the split parts ComfyUI users keep
(diffusion model in BFL names, clip_l, t5xxl, ae) draw the diffusers folder's picture."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sdkit.errors import SdkitError
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample.sampler import Sampler, Settings
from sdkit.runtime.toyscore import IMAGE_SIZE, SHAPES, score_image

FLUX = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "flux"
FOLDER = FLUX / "diffusers"
# half the builder's test protocol (fixtures/toy/toy_eval.py: "a {colour} {shape}", 20 steps,
# guidance 6 as real CFG, the shape cycling with the seed), seeds 0-3
ASKED = [(colour, SHAPES[seed], seed) for colour in ("red", "green", "blue", "yellow") for seed in range(4)]
SETTINGS = Settings(steps=20, cfg=6.0, width=IMAGE_SIZE, height=IMAGE_SIZE)

pytestmark = pytest.mark.skipif(not (FOLDER / "model_index.json").is_file(),
                                reason="toy-flux not built (make fixtures)")


@pytest.fixture(scope="module")
def folder_sampler() -> Sampler:
    return Sampler(load_model(FOLDER, flow=True))


def _parts_model():
    return load_model(FLUX / "toy-flux.safetensors", config=FOLDER, vae=FLUX / "ae.safetensors", flow=True,
                      text_encoders=[FLUX / "toy-flux.clip_l.safetensors", FLUX / "toy-flux.t5xxl.safetensors"])


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_toy_flux_draws_the_asked_colour_and_shape(folder_sampler):
    found = []
    for colour, shape, seed in ASKED:
        plan = folder_sampler.plan_prompt(f"a {colour} {shape}")
        score = score_image(folder_sampler.generate(plan, replace(SETTINGS, seed=seed))[0].image)
        found.append(((colour, shape), (score.colour, score.shape)))
    colours = sum(asked[0] == seen[0] for asked, seen in found)
    shapes = sum(asked[1] == seen[1] for asked, seen in found)
    # the card records 100% for both on the whole protocol, and colour 98%, shape 79% over the
    # whole palette (chance: 25%); crosses are what it draws worst
    print(f"toy-flux: colour {colours}/{len(found)}, shape {shapes}/{len(found)}")
    assert colours >= len(found) - 1 and shapes >= len(found) - 2, found


def test_toy_flux_png_parameters_name_the_flow_sampler_and_real_cfg(folder_sampler):
    sample = folder_sampler.generate(folder_sampler.plan_prompt("a red circle"), Settings(steps=2, cfg=6.0))[0]
    assert sample.image.size == (IMAGE_SIZE, IMAGE_SIZE)  # the VAE's sample size: the model's own
    assert "Sampler: Euler, Schedule type: Automatic, CFG scale: 6, Seed: 0, Size: 32x32" in sample.parameters


def test_toy_flux_draws_what_diffusers_draws(folder_sampler):
    from diffusers import FluxPipeline

    reference = FluxPipeline.from_pretrained(FOLDER, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = reference("a green cross", negative_prompt="", true_cfg_scale=6.0, num_inference_steps=20,
                           height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=16,
                           generator=torch.Generator().manual_seed(5)).images[0]
    settings = Settings(steps=20, cfg=6.0, seed=5, width=IMAGE_SIZE, height=IMAGE_SIZE)
    ours = folder_sampler.generate(folder_sampler.plan_prompt("a green cross"), settings)[0].image
    assert np.abs(_pixels(ours) - _pixels(theirs)).max() <= 1


def test_toy_flux_parts_draw_the_folders_picture(folder_sampler):
    settings = Settings(steps=20, cfg=6.0, seed=3, width=IMAGE_SIZE, height=IMAGE_SIZE)
    parts = Sampler(_parts_model())
    ours = parts.generate(parts.plan_prompt("a blue square"), settings)[0].image
    folder = folder_sampler.generate(folder_sampler.plan_prompt("a blue square"), settings)[0].image
    assert np.abs(_pixels(ours) - _pixels(folder)).max() <= 2  # the parts store fp16 weights


def test_toy_flux_reads_a1111_syntax_as_plain_text(folder_sampler):
    """FLUX.1 has no A1111 syntax: brackets, weights and BREAK reach its encoders as written."""
    from diffusers import FluxPipeline

    prompt = "a (green:1.3) [cross:square:0.5] BREAK [red|blue] \\(x\\)"
    reference = FluxPipeline.from_pretrained(FOLDER, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = reference(prompt, negative_prompt="", true_cfg_scale=6.0, num_inference_steps=4,
                           height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=16,
                           generator=torch.Generator().manual_seed(5)).images[0]
    settings = Settings(steps=4, cfg=6.0, seed=5, width=IMAGE_SIZE, height=IMAGE_SIZE)
    sample = folder_sampler.generate(folder_sampler.plan_prompt(prompt), settings)[0]
    assert np.abs(_pixels(sample.image) - _pixels(theirs)).max() <= 1
    assert sample.parameters.startswith(prompt + "\n")


@pytest.mark.parametrize("settings, message", [
    (Settings(steps=2, scheduler="dpm++2m"), "does not sample flow-matching models"),
    (Settings(steps=2, clip_skip=2), "--clip-skip does not apply to FLUX.1"),
    (Settings(steps=2, width=36), "multiple of 8"),
])
def test_toy_flux_refuses_what_it_cannot_do_in_one_line(folder_sampler, settings, message):
    with pytest.raises(SdkitError, match=message):
        folder_sampler.generate(folder_sampler.plan_prompt("a red circle"), settings)


def test_flux_diffusion_model_alone_asks_for_its_parts():
    with pytest.raises(SdkitError, match="not a whole model"):
        load_model(FLUX / "toy-flux.safetensors", flow=True)
    with pytest.raises(SdkitError, match="has no text_encoder_2"):
        load_model(FLUX / "toy-flux.safetensors", config=FOLDER, vae=FLUX / "ae.safetensors", flow=True,
                   text_encoders=[FLUX / "toy-flux.clip_l.safetensors"])


def test_flux_is_refused_where_only_unets_run():
    with pytest.raises(SdkitError, match="cannot be sampled"):
        load_model(FOLDER)


def test_toy_flux_refuses_hypernetworks_in_one_line(folder_sampler, tmp_path):
    from sdkit.runtime.sample.plan import HypernetRequest, PromptPlan

    plan = PromptPlan("a red circle", (), (HypernetRequest(tmp_path / "style.pt", "style", 1.0),))
    with pytest.raises(SdkitError, match="hypernetworks are not applied to flux models"):
        folder_sampler.generate(plan, Settings(steps=2))


def _dequantized_by_hand(quantized: Path, out: Path) -> Path:
    """ComfyUI's fp8 layouts read back with torch alone: each fp8 weight times its scale
    (`scale_weight` of scaled fp8, `weight_scale` of mixed), scales and markers dropped."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(quantized)
    plain = {}
    for name, value in tensors.items():
        if name.endswith((".scale_weight", ".scale_input", ".weight_scale", ".comfy_quant")) or name == "scaled_fp8":
            continue
        layer = name[: -len(".weight")]
        scale = tensors.get(f"{layer}.scale_weight", tensors.get(f"{layer}.weight_scale"))
        plain[name] = value.float() * scale.float() if name.endswith(".weight") and scale is not None else value
    save_file(plain, out)
    return out


@pytest.mark.parametrize("scaling", ["scaled", "mixed"])
def test_toy_flux_fp8_diffusion_models_draw_their_values(scaling, tmp_path):
    """A ComfyUI fp8 file (scaled, or mixed precision) samples from the values its weights
    and scales stand for: the picture of those values written out plainly."""
    from cli_run import exit_code

    quantized = tmp_path / "fp8.safetensors"
    assert exit_code(["convert", str(FLUX / "toy-flux.safetensors"), "--dtype", "fp8_e4m3fn", "--fp8-scaling",
                      scaling, "-o", str(quantized)]) == 0
    pictures = []
    for path in (quantized, _dequantized_by_hand(quantized, tmp_path / "plain.safetensors")):
        sampler = Sampler(load_model(path, config=FOLDER, vae=FLUX / "ae.safetensors", flow=True, text_encoders=[
            FLUX / "toy-flux.clip_l.safetensors", FLUX / "toy-flux.t5xxl.safetensors"]))
        settings = Settings(steps=8, cfg=6.0, seed=1, width=IMAGE_SIZE, height=IMAGE_SIZE)
        pictures.append(_pixels(sampler.generate(sampler.plan_prompt("a red circle"), settings)[0].image))
    assert np.array_equal(*pictures)


def _encoder_lora(path: Path) -> Path:
    """A random LoRA on toy-flux's text encoders only, named as kohya names them: CLIP-L
    `lora_te1_…`, T5 `lora_te3_…` (sd-scripts' T5 prefix in every family)."""
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(5)
    lora = {}
    for prefix, part, layers in (("lora_te1_", "clip_l", ("text_model.encoder.layers.0.self_attn.v_proj",
                                                          "text_model.encoder.layers.1.mlp.fc1")),
                                 ("lora_te3_", "t5xxl", ("encoder.block.0.layer.0.SelfAttention.v",
                                                         "encoder.block.1.layer.0.SelfAttention.o"))):
        weights = load_file(FLUX / f"toy-flux.{part}.safetensors")
        for layer in layers:
            rows, columns = weights[layer + ".weight"].shape
            name = prefix + layer.replace(".", "_")
            lora[f"{name}.lora_down.weight"] = torch.randn(2, columns, generator=generator)
            lora[f"{name}.lora_up.weight"] = torch.randn(rows, 2, generator=generator)
            lora[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(lora, path)
    return path


def test_text_encoder_modules_of_a_lora_apply_while_sampling(capsys, tmp_path):
    """Sampling with a LoRA on CLIP-L and T5 draws the picture of the encoders baked with
    it (`lora bake` into the all-in-one checkpoint, split back into parts)."""
    from PIL import Image

    from cli_run import run_sdkit

    lora = _encoder_lora(tmp_path / "encoders.safetensors")
    parts = [FLUX / "toy-flux.safetensors", FLUX / "toy-flux.clip_l.safetensors",
             FLUX / "toy-flux.t5xxl.safetensors", FLUX / "ae.safetensors"]
    checkpoint, baked = tmp_path / "aio.safetensors", tmp_path / "baked.safetensors"
    assert run_sdkit(capsys, "join", *map(str, parts), "-o", str(checkpoint))[0] == 0
    assert run_sdkit(capsys, "lora", "bake", str(checkpoint), str(lora), "-o", str(baked))[0] == 0
    assert run_sdkit(capsys, "split", str(baked), "-o", str(tmp_path / "split"))[0] == 0
    encoders = sorted((tmp_path / "split" / "text_encoders").iterdir())

    def draw(name: str, diffusion_model: Path, clip_l: Path, t5: Path, *options: str) -> np.ndarray:
        out = tmp_path / f"{name}.png"
        code, _out, err = run_sdkit(capsys, "sample", str(diffusion_model), "--config", str(FOLDER), "--vae",
                                    str(FLUX / "ae.safetensors"), "--text-encoder", str(clip_l), "--text-encoder",
                                    str(t5), *options, "-p", "a red circle", "--cfg", "6", "--steps", "8",
                                    "-o", str(out))
        assert code == 0, err
        return _pixels(Image.open(out).convert("RGB"))

    plain = draw("plain", parts[0], parts[1], parts[2])
    applied = draw("applied", parts[0], parts[1], parts[2], "--lora", str(lora))
    clip_l = next(path for path in encoders if "clip_l" in path.name)
    t5 = next(path for path in encoders if "t5xxl" in path.name)
    from_baked = draw("baked", parts[0], clip_l, t5)
    assert np.abs(applied - plain).max() > 20  # the encoders' change shows
    assert np.abs(applied - from_baked).max() <= 2  # baked parts are fp16, applied runs in fp32
