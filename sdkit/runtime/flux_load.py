"""A FLUX.1 model as a diffusers `FluxPipeline`, offline: a diffusers folder, or the split
parts ComfyUI users keep (the diffusion model alone, in BFL or diffusers names, with the
text encoders and the VAE given as files).

As for the SD families (`pipeline.py`), each component is built from its config with
empty weights and the tensors are assigned to it; nothing is downloaded. Configs and
tokenizers come from `config` (a local diffusers folder of the same model), else the
model's own folder. Without a scheduler config, the released one of the design the
weights show: dev's (a guidance embedder: shift 3, resolution-dependent) or schnell's.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping

import torch

from sdkit.errors import SdkitError
from sdkit.io import LazyTensor, ModelFile, lazy_tensors, open_model

_PARTS = ("vae", "text_encoder", "text_encoder_2")  # what a diffusion model alone is given as files
# black-forest-labs/FLUX.1-{schnell,dev} scheduler/scheduler_config.json
_SCHNELL_SCHEDULE = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
_DEV_SCHEDULE = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def default_flux_schedule(transformer_config: Mapping[str, Any]) -> dict[str, Any]:
    return dict(_DEV_SCHEDULE if transformer_config.get("guidance_embeds") else _SCHNELL_SCHEDULE)


def _component_tensors(tensors: Mapping[str, LazyTensor], component: str) -> dict[str, LazyTensor]:
    head = component + "/"
    return {name[len(head):]: lazy for name, lazy in tensors.items() if name.startswith(head)}


def _build_t5(config: dict[str, Any], tensors: dict[str, LazyTensor], dtype: torch.dtype, what: str) -> Any:
    """T5EncoderModel; files keep its input table once, as `shared.weight` (the encoder's
    `embed_tokens` is the same table, tied again after loading)."""
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    from sdkit.runtime.pipeline import _assign

    with init_empty_weights():
        module = T5EncoderModel(T5Config.from_dict(config))
    tensors = dict(tensors)
    table, twin_table = "shared.weight", "encoder.embed_tokens.weight"
    for name, twin in ((twin_table, table), (table, twin_table)):
        if name not in tensors and twin in tensors:
            tensors[name] = tensors[twin]
    module = _assign(module, tensors, dtype, what)
    module.encoder.embed_tokens = module.shared
    return module


def _tokenizers(path: Path, config_dir: Path | None) -> dict[str, Any]:
    from transformers import AutoTokenizer, CLIPTokenizer

    found = {}
    for name, cls in (("tokenizer", CLIPTokenizer), ("tokenizer_2", AutoTokenizer)):
        folders = [folder / name for folder in (config_dir, path if path.is_dir() else None) if folder is not None]
        folder = next((f for f in folders if (f / "tokenizer_config.json").is_file() or (f / "vocab.json").is_file()),
                      None)
        if folder is None:
            raise SdkitError(f"{path}: no {name} found offline; pass --config DIR (a local diffusers folder "
                             "of this FLUX.1 model)")
        found[name] = cls.from_pretrained(folder, local_files_only=True)
    return found


def _folder_configs(model: ModelFile, given: Mapping[str, dict]) -> dict[str, dict]:
    configs = dict(model.extra.get("configs") or {}) if model.components else {}
    return {**configs, **given}


def build_flux_modules(path: Path, model: ModelFile, config_dir: Path | None, given: Mapping[str, dict],
                       dtype: torch.dtype, parts: Mapping[str, Path] | None = None) -> tuple[dict[str, Any], dict]:
    """The FluxPipeline components of a FLUX.1 folder (or a lone diffusion model with
    `parts`: "vae", "text_encoder", "text_encoder_2" files), and its scheduler config."""
    with ExitStack() as files:  # the parts stay open while their tensors are read
        return _build_flux_modules(path, model, config_dir, given, dtype, dict(parts or {}), files)


def _build_flux_modules(path: Path, model: ModelFile, config_dir: Path | None, given: Mapping[str, dict],
                        dtype: torch.dtype, parts: dict[str, Path], files: ExitStack) -> tuple[dict[str, Any], dict]:
    configs = _folder_configs(model, given)
    if model.components:
        tensors = lazy_tensors(model)
    elif "transformer" not in configs:
        raise SdkitError(f"{path}: a FLUX.1 diffusion model alone samples with --config DIR (a local diffusers "
                         "folder of this model: its configs and tokenizers)")
    else:  # a lone diffusion model: its tensors are the transformer's
        tensors = {f"transformer/{k}": v for k, v in _transformer_in_diffusers_names(model, configs).items()}
    missing = [c for c in ("transformer", *_PARTS)
               if c not in configs or not (_component_tensors(tensors, c) or c in parts)]
    if missing:
        raise SdkitError(f"{path}: has no {missing[0]}; a FLUX.1 model samples with its text encoders and VAE "
                         "(a diffusers folder, or the diffusion model with --text-encoder and --vae files)")
    modules = {"transformer": _build_component("transformer", configs, _component_tensors(tensors, "transformer"),
                                               dtype, f"{path}: transformer")}
    for component in _PARTS:
        if component in parts:
            source = _part_tensors(files.enter_context(open_model(parts[component])), component, configs)
        else:
            source = _component_tensors(tensors, component)
        modules[component] = _build_component(component, configs, source, dtype,
                                              f"{parts.get(component, path)}: {component}")
    modules.update(_tokenizers(path, config_dir))
    schedule = configs.get("scheduler") or default_flux_schedule(configs["transformer"])
    return modules, schedule


def _build_component(component: str, configs: Mapping[str, dict], tensors: dict[str, LazyTensor],
                     dtype: torch.dtype, what: str) -> Any:
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from sdkit.runtime.pipeline import _build_diffusers_model, _build_text_encoder

    if component == "text_encoder":
        return _build_text_encoder(configs[component], tensors, dtype, what)
    if component == "text_encoder_2":
        return _build_t5(configs[component], tensors, dtype, what)
    cls = FluxTransformer2DModel if component == "transformer" else AutoencoderKL
    return _build_diffusers_model(cls, configs[component], tensors, dtype, what)


def _transformer_in_diffusers_names(model: ModelFile, configs: Mapping[str, dict]) -> dict[str, LazyTensor]:
    """A lone FLUX.1 diffusion model's tensors in diffusers names (BFL files converted
    through the family's key map, lazily); scaled fp8 and mixed-precision weights as the
    values they stand for (ComfyUI's fp8 files)."""
    from sdkit.arch import identify
    from sdkit.arch.fingerprint import match_transformers
    from sdkit.arch.keymaps.transformer import check_config, transformer_plan
    from sdkit.arch.keyview import KeyView
    from sdkit.ops.convert.dequantize import plain_values
    from sdkit.ops.layout import plan_tensors

    prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in model.infos) else ""
    (match,) = match_transformers(KeyView(model, prefix))
    if "transformer" in configs:
        check_config(match.family, configs["transformer"], match.dims, match.flags)
    tensors = plain_values(model, identify(model), lazy_tensors(model))
    if match.layout.convention == "diffusers":
        return {name[len(prefix):]: lazy for name, lazy in tensors.items() if name.startswith(prefix)}
    plan = transformer_plan(match.family, match.dims, "ldm_to_diffusers", list(tensors), prefix)
    return plan_tensors(plan, tensors)


def _part_tensors(part: ModelFile, component: str, configs: Mapping[str, dict]) -> dict[str, LazyTensor]:
    """A text encoder or VAE given as its own file, in diffusers / transformers names; a
    scaled fp8 text encoder (ComfyUI's t5xxl_fp8_e4m3fn_scaled) as the values it stands for."""
    from sdkit.arch import identify
    from sdkit.ops.convert.dequantize import plain_values
    from sdkit.ops.layout import extract_component

    identity = identify(part)
    if component == "vae":
        return extract_component(part, "vae", "diffusers", identity=identity, configs={"vae": configs["vae"]})
    return plain_values(part, identity, dict(lazy_tensors(part)))


def text_encoder_component(path: Path) -> str:
    """Which FLUX.1 text encoder a file holds: T5 (`encoder.block.N`) or CLIP."""
    with open_model(path) as part:
        return "text_encoder_2" if any(".block." in name for name in part.infos) else "text_encoder"


def assemble_flux(modules: Mapping[str, Any], scheduler_config: Mapping[str, Any]) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config)),
                        vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=modules["tokenizer"],
                        text_encoder_2=modules["text_encoder_2"], tokenizer_2=modules["tokenizer_2"],
                        transformer=modules["transformer"])
    pipe.set_progress_bar_config(disable=True)
    return pipe
