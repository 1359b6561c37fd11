"""What every training method provides to the loop.

The loop freezes the whole model first; a method's `setup` then makes trainable exactly
the part it trains (and adds its own modules), so the loss can reach nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdkit.runtime.pipeline import LoadedModel
from sdkit.runtime.train.config import TrainConfig


@dataclass
class SaveContext:
    """What an output file needs to know about the run that made it."""

    path: Path
    steps: int
    prediction: str  # "epsilon" | "v"
    dtype: torch.dtype  # tensors are written in this dtype
    training_metadata: dict[str, str]  # kohya `ss_*` keys describing the run
    recipe_params: dict[str, Any]
    inputs: list[str]
    input_hashes: dict[str, str] = field(default_factory=dict)
    base_short_hash: str | None = None  # AutoV2 (10 hex) of the base, as A1111 records it
    overwrite: bool = False


class TrainingMethod:
    """Base: trains nothing, saves nothing; subclasses override what they change."""

    name = "none"
    # the text encoders' forward must keep gradients (their weights or inputs train)
    text_grad = False

    def __init__(self, config: TrainConfig, model: LoadedModel) -> None:
        self.config = config
        self.model = model
        self.notes: list[str] = []

    @property
    def pipe(self) -> Any:
        return self.model.pipe

    def text_encoders(self) -> list[nn.Module]:
        return [getattr(self.pipe, name) for name in self.model.text_components]

    def setup(self, generator: torch.Generator) -> None:
        """Make the trained part trainable (everything is frozen when this runs)."""
        raise NotImplementedError

    def extra_module(self) -> nn.Module | None:
        """Trainable modules that live outside the UNet and text encoders."""
        return None

    def parameter_groups(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def caption(self, text: str) -> str:
        """A training caption as the text encoders should see it."""
        return text

    def prompt(self, text: str) -> str:
        """A sampling prompt (previews) as the text encoders should see it."""
        return text

    def after_optimizer_step(self) -> None:
        """Repairs after each optimizer step (textual inversion restores other rows)."""

    def save(self, context: SaveContext) -> list[Path]:
        raise NotImplementedError


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [parameter for parameter in module.parameters() if parameter.requires_grad]
