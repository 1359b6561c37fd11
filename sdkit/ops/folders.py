"""Write a diffusers pipeline folder from converted tensors, atomically.

The folder holds `model_index.json`, each component's `config.json` (the config the key
plan followed) with its weights written by the streaming writer
(`diffusion_pytorch_model.safetensors` for UNet / VAE, `model.safetensors` for text
encoders, whose keys all sit under `text_model.` as transformers 4 and ComfyUI read
them), a scheduler config, and tokenizers when one can be had without the network:
from `config_dir` (a local diffusers folder of the same model), else from the family's
reference repository in the local Hugging Face cache when its vocabulary fits the text
encoder. A single file holds no tokenizer; without either source the folder is written
without one and the result says so.

Everything is built in a hidden `.partial` folder beside the target and installed at
the end (`sdkit.io.output_path.build_in_partial`), so a failure leaves no half-written
output.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdkit.arch.keymaps import stored_clip_names
from sdkit.data.pipeline_defaults import (
    SHIPPED_TOKENIZER,
    TOKENIZER_PADS,
    released_scheduler_config,
    tokenizer_fits,
    write_shipped_tokenizer,
)
from sdkit.errors import SdkitError
from sdkit.io import LazyTensor, write_safetensors
from sdkit.io.ahead import DEFAULT_WORKERS, single_threaded_torch
from sdkit.io.output_path import build_in_partial
from sdkit.ops.layout import COMPONENTS

Progress = Callable[[int], None]
Finish = Callable[[Path], None]
_WEIGHT_NAMES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                 "transformer": "diffusion_pytorch_model.safetensors",
                 "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors",
                 "text_encoder_3": "model.safetensors"}
_CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL")}
_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
_SLOTS = {"sd1": ("unet", "vae", "text_encoder"), "sd2": ("unet", "vae", "text_encoder"),
          "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
          "sdxl_refiner": ("unet", "vae", "text_encoder", "text_encoder_2")}
_SD_PIPELINE = ("StableDiffusionPipeline", {"safety_checker": [None, None], "feature_extractor": [None, None],
                                             "image_encoder": [None, None], "requires_safety_checker": False})
_PIPELINES = {
    "sd1": _SD_PIPELINE,
    "sd2": _SD_PIPELINE,
    "sdxl": ("StableDiffusionXLPipeline", {"image_encoder": [None, None], "feature_extractor": [None, None],
                                           "force_zeros_for_empty_prompt": True}),
    "sdxl_refiner": ("StableDiffusionXLImg2ImgPipeline", {
        "image_encoder": [None, None], "feature_extractor": [None, None],
        "requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False}),
}
_REFERENCE_REPOS = {"sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd2": "stabilityai/stable-diffusion-2-1",
                    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
                    "sdxl_refiner": "stabilityai/stable-diffusion-xl-refiner-1.0"}


@dataclass
class FolderResult:
    path: Path
    components: list[str]
    tokenizers: dict[str, str] = field(default_factory=dict)  # tokenizer folder -> where it came from
    notes: list[str] = field(default_factory=list)


def read_config_dir(folder: str | os.PathLike[str] | None) -> dict[str, dict]:
    """Component configs (`<component>/config.json`) of a local diffusers folder."""
    if folder is None:
        return {}
    from sdkit.io.diffusers_folder import read_json

    root = Path(folder)
    if not root.is_dir():
        raise SdkitError(f"{root}: --config must be a diffusers folder")
    configs = {}
    for component in (*COMPONENTS, "text_encoder_3", "transformer"):
        path = root / component / "config.json"
        if path.is_file():
            config = read_json(path)
            if not isinstance(config, dict):
                raise SdkitError(f"{path}: not a JSON object")
            configs[component] = config
    if not configs:
        raise SdkitError(f"{root}: no unet/, transformer/, vae/ or text_encoder/ config.json found (--config)")
    return configs


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.0.0"


def _text_encoder_class(config: Mapping[str, Any]) -> str:
    architectures = config.get("architectures") or ["CLIPTextModel"]
    return str(architectures[0])


def component_config(component: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json of a component: the plan's config with the class it names."""
    written = dict(config)
    if component in _CLASSES or "_class_name" in config:  # a transformer's config names its class
        written.setdefault("_class_name", _CLASSES.get(component, ("", ""))[1])
        written.setdefault("_diffusers_version", _diffusers_version())
    else:
        written.setdefault("architectures", [_text_encoder_class(config)])
        written.setdefault("model_type", "clip_text_model")
    return written


def scheduler_config(layout: str, prediction: str, zero_snr: bool = False) -> dict[str, Any]:
    """The scheduler of a written pipeline; `zero_snr` for models trained for a zero
    terminal SNR schedule (diffusers rescales the betas so the last step is pure noise)."""
    return {**released_scheduler_config(layout, prediction, zero_snr), "_diffusers_version": _diffusers_version()}


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _model_index(layout: str, components: list[str], configs: Mapping[str, dict], written: list[str],
                 scheduler: list[str], base: Mapping[str, Any] | None) -> dict[str, Any]:
    """model_index.json: `written` names the config-only folders (tokenizers, ...) present."""
    class_name, settings = _PIPELINES[layout]
    index: dict[str, Any] = dict(base) if base else {"_class_name": class_name, **settings}
    index["_diffusers_version"] = _diffusers_version()
    for name, value in list(index.items()):  # parts we do not write must not be looked for
        if isinstance(value, list) and name not in components and name not in written:
            index[name] = [None, None]
    for component in _SLOTS[layout]:
        present = component in components
        if component in _CLASSES:
            index[component] = list(_CLASSES[component]) if present else [None, None]
            continue
        index[component] = ["transformers", _text_encoder_class(configs[component])] if present else [None, None]
        tokenizer = _TOKENIZER_OF[component]
        copied = index.get(tokenizer) if isinstance(index.get(tokenizer), list) else None
        if tokenizer not in written:
            index[tokenizer] = [None, None]
        elif not copied or copied[-1] is None:  # keep the class a copied folder was saved with
            index[tokenizer] = ["transformers", "CLIPTokenizer"]
    index["scheduler"] = scheduler
    return index


def _vocab_size(folder: Path) -> int | None:
    try:
        return len(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def _cached_tokenizer(layout: str, name: str, rows: int) -> Path | None:
    """The reference repository's tokenizer from the local HF cache, if its ids fit `rows`."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(_REFERENCE_REPOS[layout], allow_patterns=[f"{name}/*"],
                                        local_files_only=True)) / name
    except Exception:  # noqa: BLE001 - huggingface_hub raises several types for "not in the cache"
        return None
    size = _vocab_size(folder) if folder.is_dir() else None
    return folder if size is not None and size <= rows else None


def _tokenizer_sources(layout: str, components: list[str], configs: Mapping[str, dict],
                       config_dir: Path | None) -> dict[str, tuple[Path | None, str]]:
    """tokenizer folder name -> (source folder, or None for the shipped one; description)."""
    found: dict[str, tuple[Path | None, str]] = {}
    for component, name in _TOKENIZER_OF.items():
        if component not in components:
            continue
        if config_dir is not None and (config_dir / name).is_dir():
            found[name] = (config_dir / name, str(config_dir / name))
            continue
        cached = _cached_tokenizer(layout, name, int(configs[component].get("vocab_size", 0)))
        if cached is not None:
            found[name] = (cached, f"{_REFERENCE_REPOS[layout]} (local Hugging Face cache)")
        elif name in TOKENIZER_PADS.get(layout, {}) and tokenizer_fits(configs[component]):
            found[name] = (None, SHIPPED_TOKENIZER)
    return found


def stored_tensors(component: str, tensors: Mapping[str, LazyTensor],
                   config: Mapping[str, Any] | None = None) -> dict[str, LazyTensor]:
    """A diffusers component's tensors named as its weight file stores them (a CLIP text
    encoder's under `text_model.`; a T5 or a language model's as they are)."""
    clip = component in _TOKENIZER_OF and (config is None or _text_encoder_class(config).startswith("CLIP"))
    return stored_clip_names(tensors) if clip else dict(tensors)


def write_component_folder(folder: Path, component: str, tensors: Mapping[str, LazyTensor],
                           config: Mapping[str, Any], metadata: Mapping[str, str],
                           progress: Progress | None = None, finish: Finish | None = None) -> None:
    """config.json + weights of one component into an existing empty folder.

    `finish(path)` runs on the written weight file before it is renamed into place (e.g. to
    patch a digest into its metadata).
    """
    _write_json(folder / "config.json", component_config(component, config))
    write_on_workers(folder / _WEIGHT_NAMES[component], stored_tensors(component, tensors, config), metadata,
                     progress=progress, finish=finish)


def write_on_workers(path: Path, tensors: Mapping[str, LazyTensor], metadata: Mapping[str, str],
                     **options: Any) -> None:
    """`write_safetensors` with tensors made (cast, converted) on the writer's workers, one
    torch thread each: a second torch thread pool (the writer's own, for tensors cast in
    pieces) would spin against theirs, which cost a third of an SDXL convert's time."""
    with single_threaded_torch():
        write_safetensors(path, tensors, metadata, workers=DEFAULT_WORKERS, **options)


def write_pipeline_folder(target: Path, tensors: Mapping[str, LazyTensor], configs: Mapping[str, dict],
                          layout: str, *, prediction: str, zero_snr: bool = False, metadata_for: Callable[[str], Mapping[str, str]],
                          config_dir: Path | None = None, overwrite: bool = False,
                          progress: Progress | None = None, finish: Finish | None = None) -> FolderResult:
    """A loadable diffusers pipeline folder from `<component>/<key>` tensors."""
    by_component: dict[str, dict[str, LazyTensor]] = {}
    for name, lazy in tensors.items():
        component, key = name.split("/", 1)
        by_component.setdefault(component, {})[key] = lazy
    components = [c for c in _WEIGHT_NAMES if c in by_component]
    tokenizers = _tokenizer_sources(layout, components, configs, config_dir)
    base_index = _read_index(config_dir)

    def fill(folder: Path) -> FolderResult:
        for component in components:
            (folder / component).mkdir()
            write_component_folder(folder / component, component, by_component[component], configs[component],
                                   metadata_for(component), progress, finish)
        scheduler = _write_scheduler(folder, layout, prediction, zero_snr, config_dir)
        written = ["scheduler"]
        for name, (source, _) in tokenizers.items():
            if source is None:
                write_shipped_tokenizer(folder / name, layout, name)
            else:
                shutil.copytree(source, folder / name)
            written.append(name)
        if config_dir is not None and (config_dir / "feature_extractor").is_dir():
            shutil.copytree(config_dir / "feature_extractor", folder / "feature_extractor")
            written.append("feature_extractor")
        _write_json(folder / "model_index.json",
                    _model_index(layout, components, configs, written, scheduler, base_index))
        return FolderResult(target, components, {name: where for name, (_, where) in tokenizers.items()})

    result = build_in_partial(target, overwrite, fill)
    missing = [_TOKENIZER_OF[c] for c in components if c in _TOKENIZER_OF and _TOKENIZER_OF[c] not in tokenizers]
    if missing:
        names = " and ".join(missing)
        passed = ", ".join(f"{name}=None" for name in missing)
        result.notes.append(f"written without {names}: a single file holds none, none was found locally and "
                            "its text encoder's vocabulary is not CLIP's; "
                            f"load the folder with from_pretrained(..., {passed}) or a tokenizer of your own, "
                            "or convert again with --config <the base model's diffusers folder>")
    return result


def _read_index(config_dir: Path | None) -> dict[str, Any] | None:
    if config_dir is None or not (config_dir / "model_index.json").is_file():
        return None
    from sdkit.io.diffusers_folder import read_json

    index = read_json(config_dir / "model_index.json")
    return index if isinstance(index, dict) else None


def _write_scheduler(folder: Path, layout: str, prediction: str, zero_snr: bool,
                     config_dir: Path | None) -> list[str]:
    """Write scheduler/ (copied from `config_dir` when it has one); its model_index entry."""
    copied = config_dir / "scheduler" if config_dir is not None else None
    if copied is not None and (copied / "scheduler_config.json").is_file():
        from sdkit.io.diffusers_folder import read_json

        shutil.copytree(copied, folder / "scheduler")
        config = read_json(copied / "scheduler_config.json")
        if isinstance(config, dict) and isinstance(config.get("_class_name"), str):
            # a borrowed scheduler takes this model's own prediction and schedule
            if prediction in ("v", "epsilon"):
                config["prediction_type"] = "v_prediction" if prediction == "v" else "epsilon"
            if zero_snr:
                config["rescale_betas_zero_snr"] = True
            _write_json(folder / "scheduler" / "scheduler_config.json", config)
            return ["diffusers", config["_class_name"]]
        shutil.rmtree(folder / "scheduler")
    (folder / "scheduler").mkdir()
    config = scheduler_config(layout, prediction, zero_snr)
    _write_json(folder / "scheduler" / "scheduler_config.json", config)
    return ["diffusers", config["_class_name"]]
