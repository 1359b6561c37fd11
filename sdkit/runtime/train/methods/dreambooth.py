"""DreamBooth: the whole UNet (and optionally the text encoders) fine-tuned.

Prior preservation (class pictures drawn by the base model, their loss weighted by
`--prior-loss-weight`) is the loop's business; this method only says what trains and
writes the result: a single-file checkpoint in the LDM layout A1111 and ComfyUI load
(through the exact key maps of `sdkit.arch.keymaps`), or with `--format diffusers` a
diffusers pipeline folder (diffusers' own `save_pretrained`, built in a hidden folder and
moved into place). Trainable weights are float32 while training; the file is written in
`--save-precision` (fp16 by default, as checkpoints are shared).

The parts that did not train (the VAE; the text encoders without `--train-text-encoder`)
are written from the base file's own tensors, not from the loaded model: under bf16 or
fp16 training the loaded copies were rounded to the half type to save memory, and a
checkpoint must carry the base's weights, changed only by the `--save-precision` cast.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from sdkit.arch import identify
from sdkit.io import LazyTensor, open_model, write_safetensors
from sdkit.io.model_file import dtype_code
from sdkit.io.output_path import build_in_partial
from sdkit.ops.layout import COMPONENTS, ModelView, convert_view, model_view
from sdkit.ops.recipe_meta import CHECKPOINT_TRAINING_IMPLEMENTATION, SpecFacts, build_metadata
from sdkit.runtime.train.methods.base import SaveContext, TrainingMethod, trainable

_MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()


def _cast_lazy(lazy: LazyTensor, dtype: torch.dtype) -> torch.Tensor:
    return _cast(lazy.load(), dtype)


def _saved(tensor: torch.Tensor | LazyTensor, dtype: torch.dtype) -> LazyTensor:
    """`tensor` as written: floating point cast to `dtype`, the rest as it is."""
    if isinstance(tensor, LazyTensor):
        floating = tensor.dtype.startswith(("F", "BF"))
        return LazyTensor(dtype_code(dtype) if floating else tensor.dtype, tensor.shape,
                          partial(_cast_lazy, tensor, dtype))
    code = dtype_code(dtype) if tensor.is_floating_point() else dtype_code(tensor.dtype)
    return LazyTensor(code, tuple(tensor.shape), partial(_cast, tensor, dtype))


def _base_key(tensors: Mapping[str, LazyTensor], part: str, key: str) -> LazyTensor | None:
    """The base's tensor for a module key; CLIP keys come with or without `text_model.`."""
    for name in (key, f"text_model.{key}", key.removeprefix("text_model.")):
        if f"{part}/{name}" in tensors:
            return tensors[f"{part}/{name}"]
    return None


@contextmanager
def base_tensors(base: Path, config_dir: Path | None,
                 parts: Mapping[str, torch.nn.Module]) -> Iterator[dict[str, torch.Tensor | LazyTensor]]:
    """The base file's own tensors of `parts`, named `<part>/<key of the part's state dict>`
    (read lazily: the file stays open until the block ends). A buffer the file lacks (CLIP
    position ids) comes from the module."""
    from sdkit.runtime.pipeline import read_config_folder

    given = read_config_folder(config_dir) if config_dir is not None else {}
    with open_model(base) as model:
        view = model_view(model, identify(model))
        converted = convert_view(view, "diffusers", {c: given[c] for c in COMPONENTS if c in given}).tensors
        found: dict[str, torch.Tensor | LazyTensor] = {}
        for part, module in parts.items():
            for key, tensor in module.state_dict().items():
                found[f"{part}/{key}"] = _base_key(converted, part, key) or tensor
        yield found


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

    def _untouched(self) -> dict[str, torch.nn.Module]:
        trained = self.trained_modules()
        return {name: module for name, module in self._parts().items() if name not in trained}

    def save(self, context: SaveContext) -> list[Path]:
        if self.config.dreambooth.format == "diffusers":
            return [self._save_folder(context)]
        parts = self._parts()
        with base_tensors(self.config.base, self.config.config_dir, self._untouched()) as kept:
            tensors = {f"{name}/{key}": _saved(t, context.dtype) for name, module in self.trained_modules().items()
                       for key, t in module.state_dict().items()}
            tensors.update({name: _saved(t, context.dtype) for name, t in kept.items()})
            view = ModelView("diffusers", self.model.layout, tensors, list(parts),
                             {name: _config(module) for name, module in parts.items()})
            converted = convert_view(view, "ldm")
            facts = SpecFacts(family=self.model.family, prediction=context.prediction,
                              implementation=CHECKPOINT_TRAINING_IMPLEMENTATION)
            metadata = build_metadata("train", context.inputs, context.recipe_params, facts,
                                      context.training_metadata, title=context.path.stem,
                                      hashes=context.input_hashes)
            return [write_safetensors(context.path, converted.tensors, metadata, overwrite=context.overwrite)]

    def _restore_untouched(self) -> None:
        """Put the base's own weights back into the parts that did not train."""
        untouched = self._untouched()
        with base_tensors(self.config.base, self.config.config_dir, untouched) as kept:
            for name, module in untouched.items():
                head, device = name + "/", next(module.parameters()).device
                state = {key[len(head):]: (t.load() if isinstance(t, LazyTensor) else t).to(device)
                         for key, t in kept.items() if key.startswith(head)}
                module.load_state_dict(state, assign=True)

    def _save_folder(self, context: SaveContext) -> Path:
        pipe = self.pipe
        self._restore_untouched()
        for module in self._parts().values():
            module.to(context.dtype)

        def fill(folder: Path) -> None:
            pipe.save_pretrained(folder, safe_serialization=True)

        build_in_partial(context.path, context.overwrite, fill)
        return context.path
