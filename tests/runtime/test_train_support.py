"""Helpers shared by the trainer tests (no tests here): concept pictures, configs, runs,
and model outputs to compare trained models with what loads from their files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from sdkit.runtime.train import (DataOptions, DreamBoothOptions, EmbeddingOptions, HypernetOptions, NetworkOptions,
                                 OptimOptions, RunOptions, TrainConfig)
from sdkit.runtime.train.loop import Trainer

TINY_SIZE = 32
SUFFIX = {"hypernet": ".pt"}


def concept_pictures(folder: Path, count: int = 4, caption: str = "a photo of sks",
                     colour: tuple[int, int, int] = (150, 50, 200), size: tuple[int, int] = (32, 32),
                     sidecar: str = ".txt") -> Path:
    """`count` pictures of a coloured disc (jittered), each with a sidecar caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        picture = Image.new("RGB", size, "white")
        left = 4 + index % 4
        ImageDraw.Draw(picture).ellipse((left, 5, left + size[0] // 2, 5 + size[1] // 2), fill=colour)
        picture.save(folder / f"{index}.png")
        if sidecar:
            (folder / f"{index}{sidecar}").write_text(caption)
    return folder


def tiny_config(method: str, base: Path, folder: Path, output_dir: Path, *, steps: int = 2, **changes: Any) -> TrainConfig:
    """A config for the tiny models: 32 px, a few steps, a learning rate that shows."""
    output = output_dir / f"{method}{SUFFIX.get(method, '.safetensors')}"
    config = TrainConfig(method, base, changes.pop("output", output),
                         DataOptions(folder, resolution=TINY_SIZE, **changes.pop("data", {})),
                         optim=OptimOptions(steps=steps, lr=changes.pop("lr", 1e-2), **changes.pop("optim", {})),
                         network=NetworkOptions(**changes.pop("network", {})),
                         embedding=EmbeddingOptions(**changes.pop("embedding", {})),
                         hypernet=HypernetOptions(**changes.pop("hypernet", {})),
                         dreambooth=DreamBoothOptions(**changes.pop("dreambooth", {})),
                         run=RunOptions(**{"sample_steps": 4, **changes.pop("run", {})}))
    assert not changes, f"unknown config changes {changes}"
    return config


def run_trainer(config: TrainConfig) -> Trainer:
    """Train and keep the trainer, whose model is the trained one."""
    trainer = Trainer(config, None)
    trainer.result = trainer.run()
    return trainer


def unet_output(unet: torch.nn.Module, context_width: int, seed: int = 0) -> torch.Tensor:
    """The UNet's prediction for one fixed noisy latent, timestep and context."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, context_width, generator=generator)
    with torch.no_grad():
        return unet(latent, torch.tensor([500]), context).sample


def trainable_names(*modules: torch.nn.Module) -> set[str]:
    return {f"{index}.{name}" for index, module in enumerate(modules)
            for name, parameter in module.named_parameters() if parameter.requires_grad}


def base_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights of a (possibly peft-injected) module under the names of the plain module."""
    return {name.replace(".base_layer", ""): tensor.detach().clone() for name, tensor in module.state_dict().items()
            if not any(part in name for part in ("lora_", "hada_", "lokr_"))}
