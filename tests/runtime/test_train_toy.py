"""End to end on the toy SD1 model (fixtures/toy), which really draws coloured shapes:
each method learns "a photo of sks" = a purple cross, which the base does not draw for
that prompt; its file then makes sdkit (through `sdkit verify`) and the peer that loads
such files (diffusers, lycoris-lora) draw the concept in >= 80% of seeds, against
<= 20% without. DreamBooth with prior preservation keeps drawing its class; without it
the class drifts towards the instance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdkit.runtime.toyscore import score_image, write_concept_pictures
from sdkit.runtime.train import (DataOptions, DreamBoothOptions, EmbeddingOptions, NetworkOptions, OptimOptions,
                                 RunOptions, TrainConfig, train)
from sdkit.runtime.train.verify import VerifyJob, verify_adapter

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "sd1"
FOLDER, FILE = TOY / "diffusers", TOY / "toy-sd1.safetensors"
COLOUR, SHAPE = "purple", "cross"
PROMPT = "a photo of sks"
SEEDS = 10
STEPS, CFG = 20, 6.0

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not FILE.is_file(), reason="toy models not built (make fixtures)")]


@pytest.fixture(scope="module")
def concept(tmp_path_factory) -> Path:
    return write_concept_pictures(tmp_path_factory.mktemp("concept"), COLOUR, SHAPE, PROMPT)


def toy_train(method: str, data: Path, output: Path, steps: int, lr: float, text_encoder_lr: float | None = None,
              **options: object) -> Path:
    config = TrainConfig(method, FILE, output, DataOptions(data), config_dir=FOLDER,
                         optim=OptimOptions(steps=steps, lr=lr, text_encoder_lr=text_encoder_lr, batch_size=4),
                         network=options.pop("network", NetworkOptions()),
                         embedding=options.pop("embedding", EmbeddingOptions()),
                         dreambooth=options.pop("dreambooth", DreamBoothOptions()),
                         run=RunOptions(seed=1, sample_steps=STEPS))
    assert not options
    train(config)
    return output


def verified(adapter: Path, prompt: str = PROMPT, expect: str = f"{COLOUR}/{SHAPE}"):
    return verify_adapter(VerifyJob(adapter, FILE, prompt, expect, seeds=SEEDS, steps=STEPS, cfg=CFG,
                                    config=FOLDER, device="cpu"))


def peer_rate(pipe: object, prompt: str = PROMPT, shape: str = SHAPE) -> float:
    """Fraction of seeds a diffusers pipeline draws the concept at (DDIM, as sdkit verifies)."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in range(SEEDS)]
    with torch.no_grad():
        images = pipe([prompt] * SEEDS, num_inference_steps=STEPS, guidance_scale=CFG, generator=generators,
                      output_type="np").images
    scores = [score_image((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)) for image in images]
    return sum(s.colour == COLOUR and s.shape == shape for s in scores) / SEEDS


def toy_pipeline() -> object:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(FOLDER, safety_checker=None, local_files_only=True)


def _check(result) -> None:
    assert result.without_rate <= 0.2, result.labels_without
    assert result.with_rate >= 0.8, result.labels_with


def test_lora_learns_the_concept_in_sdkit_and_diffusers(concept, tmp_path):
    adapter = toy_train("lora", concept, tmp_path / "sks.safetensors", 120, 3e-3, network=NetworkOptions(rank=4))
    _check(verified(adapter))
    pipe = toy_pipeline()
    pipe.load_lora_weights(str(adapter))
    assert peer_rate(pipe) >= 0.8


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_lycoris_methods_learn_the_concept_in_sdkit_and_lycoris(concept, tmp_path, method, monkeypatch):
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights

    adapter = toy_train(method, concept, tmp_path / "sks.safetensors", 150, 3e-3, network=NetworkOptions(rank=4))
    _check(verified(adapter))
    pipe = toy_pipeline()
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
    network, _ = create_lycoris_from_weights(1.0, str(adapter), pipe.unet)
    network.apply_to()
    assert peer_rate(pipe) >= 0.8


def test_textual_inversion_learns_the_concept_in_sdkit_and_diffusers(concept, tmp_path):
    adapter = toy_train("ti", concept, tmp_path / "sks.safetensors", 200, 3e-2,
                        embedding=EmbeddingOptions(init_word="shape", vectors=2))
    _check(verified(adapter))
    pipe = toy_pipeline()
    pipe.load_textual_inversion(str(adapter), token="sks")
    assert peer_rate(pipe) >= 0.8


def test_hypernetwork_learns_the_concept_in_sdkit(concept, tmp_path):
    adapter = toy_train("hypernet", concept, tmp_path / "sks.pt", 120, 1e-3)
    _check(verified(adapter))


def test_dreambooth_prior_preservation_keeps_the_class(tmp_path):
    """Instance: purple circles as "a photo of sks circle"; class: "a photo of a circle",
    which the base draws in greens and blues. UNet and text encoder are fine-tuned (the toy
    text encoder never saw "sks": without training it, "sks circle" and "a circle" read
    alike). With prior preservation the class keeps its colours; without it, it turns
    purple."""
    from diffusers import StableDiffusionPipeline

    data = write_concept_pictures(tmp_path / "instance", COLOUR, "circle", "a photo of sks circle")
    outputs, drift = {}, {}
    for name, prior in (("prior", "a photo of a circle"), ("plain", None)):
        preservation = {"class_prompt": prior, "num_class_images": 16, "class_dir": tmp_path / "class"} if prior else {}
        options = DreamBoothOptions(train_text_encoder=True, **preservation)
        outputs[name] = toy_train("dreambooth", data, tmp_path / f"{name}.safetensors", 150, 3e-4,
                                  text_encoder_lr=3e-3, dreambooth=options)
        instance = verified(outputs[name], "a photo of sks circle", f"{COLOUR}/circle")
        assert instance.with_rate >= 0.8, (name, instance.labels_with)
        kept = verified(outputs[name], "a photo of a circle", "circle")
        assert kept.with_rate >= 0.8 and kept.without_rate >= 0.8, (name, kept.labels_with)
        drift[name] = verified(outputs[name], "a photo of a circle", COLOUR)
    assert drift["prior"].without_rate <= 0.2 and drift["prior"].with_rate <= 0.3, drift["prior"].labels_with
    assert drift["plain"].with_rate >= drift["prior"].with_rate + 0.5, drift["plain"].labels_with
    peer = StableDiffusionPipeline.from_single_file(str(outputs["prior"]), config=str(FOLDER),
                                                    local_files_only=True, torch_dtype=torch.float32)
    assert peer_rate(peer, "a photo of sks circle", "circle") >= 0.8
