"""A window on the tensors of a ModelFile that share one name prefix.

Probes address a component by its own key names (`input_blocks.0.0.weight`) whether the
file is a standalone UNet, an LDM checkpoint (`model.diffusion_model.` prefix) or a diffusers
folder (`unet/` prefix), so one probe serves every layout.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import TYPE_CHECKING, Mapping

from sdkit.io.model_file import ModelFile, TensorInfo

if TYPE_CHECKING:
    import torch


class KeyView:
    """Tensors of `model` whose names start with `prefix`, addressed without it.

    `logical_shapes` (full names) gives the unpacked shape of weights stored packed (two
    4-bit values per byte), so that probes read a layer's real width.
    """

    def __init__(self, model: ModelFile, prefix: str = "",
                 logical_shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self.model = model
        self.prefix = prefix
        self.logical_shapes = logical_shapes or {}

    @cached_property
    def names(self) -> list[str]:
        cut = len(self.prefix)
        return [name[cut:] for name in self.model.infos if name.startswith(self.prefix)]

    def __bool__(self) -> bool:
        return bool(self.names)

    def info(self, key: str) -> TensorInfo | None:
        return self.model.infos.get(self.prefix + key)

    def shape(self, key: str) -> tuple[int, ...] | None:
        name = self.prefix + key
        return self.logical_shapes.get(name) or self.model.shape(name)

    def has(self, key: str) -> bool:
        return (self.prefix + key) in self.model.infos

    def has_prefix(self, start: str) -> bool:
        return any(name.startswith(start) for name in self.names)

    def first_ending(self, suffix: str) -> str | None:
        """First key (file order) ending with `suffix`."""
        return next((name for name in self.names if name.endswith(suffix)), None)

    def shape_ending(self, suffix: str) -> tuple[int, ...] | None:
        key = self.first_ending(suffix)
        return self.shape(key) if key else None

    def indices(self, pattern: str) -> set[int]:
        """Integers captured by the one group of `pattern` at the start of each key."""
        compiled = re.compile(pattern)
        found = set()
        for name in self.names:
            match = compiled.match(name)
            if match:
                found.add(int(match.group(1)))
        return found

    def load(self, key: str) -> "torch.Tensor":
        return self.model.load(self.prefix + key)
