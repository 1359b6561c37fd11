"""End to end on toy-flux (fixtures/toy/flux, a FLUX.1-layout model that draws coloured
shapes): a LoRA trained by `sdkit train` teaches it "a photo of sks" = a red square, which
the base never draws for that prompt (it draws no red at all there). Measured on the
verify protocol (10 seeds, 20 steps, real CFG 6, the toy scorer): the base alone <= 10%,
with the adapter >= 80% — applied while sampling, and baked by `lora bake` into the
diffusion-model file in bf16, plain fp8 (e4m3fn) and GGUF Q8_0 then drawn by `sdkit sample`
from the split parts. Oracles: diffusers' own FluxPipeline loading the file in diffusers
layout draws sdkit's picture of the kohya file (diffusers' kohya FLUX reader assumes the
released sizes, so it cannot read a toy's kohya file itself); the file converted by
`lora convert --to comfyui` bakes and applies to the same bytes;
the diffusers-layout file of the same training holds the same deltas; a LoKr loads in the
lycoris-lora package and draws sdkit's picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run_sdkit
from safetensors import safe_open

from sdkit.runtime.toyscore import IMAGE_SIZE, score_image, write_concept_pictures
from sdkit.runtime.train import DataOptions, NetworkOptions, OptimOptions, RunOptions, TrainConfig, train
from sdkit.runtime.train.verify import VerifyJob, verify_adapter

FLUX = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "flux"
FOLDER = FLUX / "diffusers"
PARTS = ["--config", str(FOLDER), "--vae", str(FLUX / "ae.safetensors"),
         "--text-encoder", str(FLUX / "toy-flux.clip_l.safetensors"),
         "--text-encoder", str(FLUX / "toy-flux.t5xxl.safetensors")]
COLOUR, SHAPE, PROMPT = "red", "square", "a photo of sks"
SEEDS, STEPS, CFG = 10, 20, 6.0
# the base converted by `sdkit convert` into the precisions a bake writes back
BASES = {"bf16": ("bf16.safetensors", ["--dtype", "bf16"]),
         "fp8": ("fp8.safetensors", ["--dtype", "fp8_e4m3fn", "--fp8-scaling", "plain"]),
         "gguf-q8_0": ("q8.gguf", ["--to", "gguf", "--quant", "Q8_0"])}

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (FOLDER / "model_index.json").is_file(),
                                                   reason="toy-flux not built (make fixtures)")]


def toy_train(data: Path, output: Path, method: str = "lora", steps: int = 80, lr: float = 3e-3,
              layout: str = "kohya") -> Path:
    config = TrainConfig(method, FOLDER, output, DataOptions(data),
                         optim=OptimOptions(steps=steps, lr=lr, batch_size=4),
                         network=NetworkOptions(rank=4, layout=layout), run=RunOptions(seed=1))
    train(config)
    return output


@pytest.fixture(scope="module")
def concept(tmp_path_factory) -> Path:
    return write_concept_pictures(tmp_path_factory.mktemp("concept"), COLOUR, SHAPE, PROMPT)


@pytest.fixture(scope="module")
def lora(concept, tmp_path_factory) -> Path:
    return toy_train(concept, tmp_path_factory.mktemp("lora") / "sks.safetensors")


def rate(pictures) -> float:
    scores = [score_image(picture) for picture in pictures]
    return sum(s.colour == COLOUR and s.shape == SHAPE for s in scores) / len(scores)


def sdkit_pictures(capsys, model: Path, out: Path, *options: str, count: int = SEEDS) -> list:
    """The PIL pictures `sdkit sample` draws at seeds 0 .. count - 1."""
    from PIL import Image

    code, _, err = run_sdkit(capsys, "sample", str(model), *options, "-p", PROMPT, "--cfg", str(CFG),
                             "--steps", str(STEPS), "--batch", str(count), "-o", str(out))
    assert code == 0, err
    paths = [out.with_name(f"{out.stem}-{i}.png") for i in range(count)] if count > 1 else [out]
    return [Image.open(path).convert("RGB") for path in paths]


def pixels(picture) -> np.ndarray:
    return np.asarray(picture, dtype=np.int16)


def test_lora_teaches_toy_flux_the_concept_sdkit_verify(lora):
    result = verify_adapter(VerifyJob(lora, FOLDER, PROMPT, f"{COLOUR}/{SHAPE}", seeds=SEEDS, steps=STEPS, cfg=CFG,
                                      device="cpu"))
    assert result.without_rate <= 0.1, result.labels_without
    assert result.with_rate >= 0.8, result.labels_with


def test_lora_file_is_kohya_layout_with_flux_metadata(lora):
    with safe_open(lora, "pt") as opened:
        keys, metadata = set(opened.keys()), opened.metadata()
        qkv = opened.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight")
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in keys
    assert "lora_unet_double_blocks_1_txt_mod_lin.alpha" in keys
    assert not any("final_layer" in key or "_in." in key for key in keys)  # kohya leaves both out
    hidden = 3 * 32  # toy-flux: 3 heads of 32
    assert qkv.shape == (3 * hidden, 3 * 4)  # q, k and v at rank 4 each, as kohya's split_qkv saves
    blocks = torch.block_diag(*[torch.ones(hidden, 4)] * 3).bool()
    assert qkv[~blocks].abs().max() == 0 and qkv[blocks].abs().min() >= 0
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-schnell/lora"  # toy-flux has no guidance embedder
    assert metadata["ss_timestep_sampling"] == "sigma" and metadata["ss_model_prediction_type"] == "raw"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_module"] == "networks.lora"


@pytest.mark.parametrize("base", sorted(BASES))
def test_lora_baked_into_the_single_file_draws_the_concept(capsys, lora, tmp_path, base):
    name, options = BASES[base]
    converted, baked = tmp_path / name, tmp_path / f"baked-{name}"
    assert run_sdkit(capsys, "convert", str(FLUX / "toy-flux.safetensors"), *options, "-o", str(converted))[0] == 0
    assert run_sdkit(capsys, "lora", "bake", str(converted), str(lora), "-o", str(baked))[0] == 0
    without = sdkit_pictures(capsys, converted, tmp_path / "base.png", *PARTS)
    pictures = sdkit_pictures(capsys, baked, tmp_path / "baked.png", *PARTS)
    assert rate(without) <= 0.1
    assert rate(pictures) >= 0.8, [score_image(p) for p in pictures]


def test_comfyui_conversion_bakes_and_applies_to_the_same_picture(capsys, lora, tmp_path):
    comfy = tmp_path / "sks-comfy.safetensors"
    assert run_sdkit(capsys, "lora", "convert", str(lora), "--to", "comfyui", "-o", str(comfy))[0] == 0
    with safe_open(comfy, "pt") as opened:
        assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight" in set(opened.keys())
    drawn = {}
    for name, adapter in (("kohya", lora), ("comfyui", comfy)):
        baked = tmp_path / f"baked-{name}.safetensors"
        assert run_sdkit(capsys, "lora", "bake", str(FLUX / "toy-flux.safetensors"), str(adapter),
                         "-o", str(baked))[0] == 0
        drawn[name] = pixels(sdkit_pictures(capsys, baked, tmp_path / f"{name}.png", *PARTS, count=1)[0])
        drawn[name + "-applied"] = pixels(sdkit_pictures(capsys, FOLDER, tmp_path / f"{name}-applied.png",
                                                         "--lora", str(adapter), count=1)[0])
    assert np.array_equal(drawn["kohya"], drawn["comfyui"])
    assert np.array_equal(drawn["kohya-applied"], drawn["comfyui-applied"])
    # the folder holds the fp32 master, the single file its fp16 cast (one level of pixels)
    assert np.abs(drawn["kohya"] - drawn["kohya-applied"]).max() <= 2


def test_diffusers_draws_sdkits_picture_of_the_kohya_file(capsys, lora, tmp_path):
    from diffusers import FluxPipeline

    peft = tmp_path / "sks-diffusers.safetensors"
    assert run_sdkit(capsys, "lora", "convert", str(lora), "--to", "diffusers", "-o", str(peft))[0] == 0
    pipe = FluxPipeline.from_pretrained(FOLDER, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(peft))
    with torch.no_grad():
        theirs = pipe(PROMPT, negative_prompt="", true_cfg_scale=CFG, num_inference_steps=STEPS, height=IMAGE_SIZE,
                      width=IMAGE_SIZE, max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images[0]
    ours = pixels(sdkit_pictures(capsys, FOLDER, tmp_path / "ours.png", "--lora", str(lora), count=1)[0])
    assert np.abs(ours - pixels(theirs)).max() <= 1


def _layer_delta(path: Path, down: str, up: str, alpha: str | None = None) -> torch.Tensor:
    with safe_open(path, "pt") as opened:
        scale = 1.0
        if alpha is not None:
            scale = opened.get_tensor(alpha).item() / opened.get_tensor(down).shape[0]
        return scale * opened.get_tensor(up) @ opened.get_tensor(down)


def test_diffusers_layout_holds_the_same_deltas(concept, tmp_path):
    kohya = toy_train(concept, tmp_path / "kohya.safetensors", steps=4)
    peft = toy_train(concept, tmp_path / "peft.safetensors", steps=4, layout="diffusers")
    fused = _layer_delta(kohya, *(f"lora_unet_double_blocks_0_img_attn_qkv.{role}"
                                  for role in ("lora_down.weight", "lora_up.weight", "alpha")))
    parts = [_layer_delta(peft, f"transformer.transformer_blocks.0.attn.{p}.lora_A.weight",
                          f"transformer.transformer_blocks.0.attn.{p}.lora_B.weight") for p in ("to_q", "to_k", "to_v")]
    assert fused.abs().max() > 0
    torch.testing.assert_close(fused, torch.cat(parts), rtol=1e-5, atol=1e-7)
    with safe_open(peft, "pt") as opened:
        metadata = opened.metadata()
    assert "transformer.r" in metadata["lora_adapter_metadata"] and metadata["ss_base_model_version"] == "flux1"


def test_lokr_loads_in_lycoris_and_draws_sdkits_picture(capsys, concept, tmp_path, monkeypatch):
    from diffusers import FluxPipeline
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights

    adapter = toy_train(concept, tmp_path / "lokr.safetensors", method="lokr", steps=10, lr=1e-2)
    with safe_open(adapter, "pt") as opened:
        assert "lycoris_transformer_blocks_0_attn_to_q.lokr_w1" in set(opened.keys())
        assert opened.metadata()["ss_network_module"] == "lycoris.kohya"
    pipe = FluxPipeline.from_pretrained(FOLDER, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lycoris")
    network, _ = create_lycoris_from_weights(1.0, str(adapter), pipe.transformer)
    network.apply_to()
    with torch.no_grad():
        theirs = pipe(PROMPT, negative_prompt="", true_cfg_scale=CFG, num_inference_steps=STEPS, height=IMAGE_SIZE,
                      width=IMAGE_SIZE, max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images[0]
    ours = pixels(sdkit_pictures(capsys, FOLDER, tmp_path / "ours.png", "--lora", str(adapter), count=1)[0])
    base = pixels(sdkit_pictures(capsys, FOLDER, tmp_path / "base.png", count=1)[0])
    assert np.abs(ours - base).max() > 8  # the adapter changes the picture
    assert np.abs(ours - pixels(theirs)).max() <= 1
