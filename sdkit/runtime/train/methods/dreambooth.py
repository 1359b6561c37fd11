"""DreamBooth: the whole UNet (and optionally the text encoders) fine-tuned.

Prior preservation (class pictures drawn by the base model, their loss weighted by
`--prior-loss-weight`) is the loop's business; this method only says what trains and
writes the result: a single-file checkpoint in the LDM layout A1111 and ComfyUI load
(through the exact key maps of `sdkit.arch.keymaps`), or with `--format diffusers` a
diffusers pipeline folder (diffusers' own `save_pretrained`, built in a hidden folder and
moved into place). Trainable weights are float32 while training; the file is written in
`--save-precision` (fp16 by default, as checkpoints are shared).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from sdkit.io import LazyTensor, write_safetensors
from sdkit.io.model_file import dtype_code
from sdkit.ops.convert_folder import build_in_partial
from sdkit.ops.convert_layout import ModelView, convert_view
from sdkit.ops.recipe_meta import SpecFacts, build_metadata
from sdkit.runtime.train.methods.base import SaveContext, TrainingMethod, trainable

_MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()


def _config(module: Any) -> dict[str, Any]:
    config = module.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


class DreamBoothMethod(TrainingMethod):
    name = "dreambooth"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.text_grad = self.config.dreambooth.train_text_encoder

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        found = {"unet": self.pipe.unet}
        if self.text_grad:
            found.update({name: getattr(self.pipe, name) for name in self.model.text_components})
        return found

    def setup(self, generator: torch.Generator) -> None:
        for module in self.trained_modules().values():
            module.requires_grad_(True)

    def parameter_groups(self) -> list[dict[str, Any]]:
        optim = self.config.optim
        return [{"params": trainable(module), "lr": optim.lr if name == "unet" else (optim.text_encoder_lr or optim.lr)}
                for name, module in self.trained_modules().items()]

    def _parts(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self.pipe, name) for name in _MODEL_PARTS if getattr(self.pipe, name, None) is not None}

    def save(self, context: SaveContext) -> list[Path]:
        if self.config.dreambooth.format == "diffusers":
            return [self._save_folder(context)]
        parts = self._parts()
        tensors = {f"{name}/{key}": LazyTensor(dtype_code(context.dtype) if t.is_floating_point() else dtype_code(t.dtype),
                                               tuple(t.shape), partial(_cast, t, context.dtype))
                   for name, module in parts.items() for key, t in module.state_dict().items()}
        view = ModelView("diffusers", self.model.layout, tensors, list(parts),
                         {name: _config(module) for name, module in parts.items()})
        converted = convert_view(view, "ldm")
        facts = SpecFacts(family=self.model.family, prediction=context.prediction)
        metadata = build_metadata("train", context.inputs, context.recipe_params, facts,
                                  context.training_metadata, title=context.path.stem, hashes=context.input_hashes)
        return [write_safetensors(context.path, converted.tensors, metadata, overwrite=context.overwrite)]

    def _save_folder(self, context: SaveContext) -> Path:
        pipe = self.pipe
        for module in self._parts().values():
            module.to(context.dtype)

        def fill(folder: Path) -> None:
            pipe.save_pretrained(folder, safe_serialization=True)

        build_in_partial(context.path, context.overwrite, fill)
        return context.path
