"""Open diffusers / transformers folders as one ModelFile.

A pipeline folder has `model_index.json` naming its components; each component folder
holds a config and, for models, weights: a single safetensors file, a sharded set with a
`*.index.json` weight map, or the older `.bin` pickles. The pipeline's tensors are named
`<component>/<key>`; `components[name]` is the component's own ModelFile (unprefixed
keys); `extra["model_index"]` and `extra["configs"][name]` are the parsed JSON files
(`model_index` is None for a lone component folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sdkit.errors import SdkitError
from sdkit.io.model_file import ModelFile, TensorInfo

if TYPE_CHECKING:
    import torch

    from sdkit.io.byte_span import ByteSpan

# weight files in the order diffusers and transformers look for them
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
    "diffusion_pytorch_model.bin", "pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json",
)
CONFIG_NAMES = ("config.json", "scheduler_config.json", "tokenizer_config.json",
                "preprocessor_config.json")

OpenFile = Callable[[Path], ModelFile]


def is_component_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and find_weights(folder) is not None


def find_weights(folder: Path) -> Path | None:
    """The weight file (or shard index) of a component folder, None when it has none."""
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    variants = sorted(folder.glob("*.safetensors"))  # e.g. only an fp16 variant was saved
    return variants[0] if len(variants) == 1 else None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SdkitError(f"{path}: not a readable JSON file ({exc.__class__.__name__})") from None


def _read_config(folder: Path) -> Any:
    for name in CONFIG_NAMES:
        if (folder / name).is_file():
            return read_json(folder / name)
    return None


def _read_shard_index(index_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(weight map, metadata as strings) of a shard index file."""
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise SdkitError(f"{index_path}: shard index without a str->str weight_map")
    for shard in set(weight_map.values()):
        if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise SdkitError(f"{index_path}: shard name {shard!r} points outside the folder")
    metadata = index.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    return weight_map, {str(key): str(value) for key, value in metadata.items()}


def open_sharded(index_path: Path, open_file: OpenFile) -> ModelFile:
    """One ModelFile over the shards an index names; each tensor loads from its shard."""
    weight_map, metadata = _read_shard_index(index_path)
    shards: dict[str, ModelFile] = {}

    def close() -> None:
        for opened in shards.values():
            opened.close()

    try:
        for shard in sorted(set(weight_map.values())):
            if not (index_path.parent / shard).is_file():
                raise SdkitError(f"{index_path}: shard {shard} is missing")
            shards[shard] = open_file(index_path.parent / shard)
        for key, shard in weight_map.items():
            if key not in shards[shard]:
                raise SdkitError(f"{index_path}: tensor {key!r} is not in shard {shard}")
    except BaseException:
        close()
        raise
    infos = {key: shards[shard].info(key) for key, shard in weight_map.items()}

    def load(key: str) -> "torch.Tensor":
        return shards[weight_map[key]].load(key)

    def span(key: str) -> "ByteSpan | None":
        return shards[weight_map[key]].span(key)

    first = next(iter(shards.values()), None)
    return ModelFile(path=index_path, format=first.format if first else "safetensors",
                     infos=infos, metadata=metadata,
                     size_bytes=sum(s.size_bytes for s in shards.values()),
                     _loader=load, _closer=close, _spanner=span)


def _open_weights(weights: Path, open_file: OpenFile) -> ModelFile:
    if weights.name.endswith(".index.json"):
        return open_sharded(weights, open_file)
    return open_file(weights)


def _listed_components(folder: Path, model_index: Any) -> list[str]:
    if not isinstance(model_index, dict):
        raise SdkitError(f"{folder / 'model_index.json'}: not a JSON object")
    names = []
    for name, value in model_index.items():
        if name.startswith("_") or not isinstance(value, list) or value[:1] == [None]:
            continue  # facts like _class_name, and components saved as [null, null]
        if "/" in name or name in (".", "..") or not (folder / name).is_dir():
            raise SdkitError(f"{folder}: component {name!r} of model_index.json has no folder")
        names.append(name)
    return names


def _combine(folder: Path, components: dict[str, ModelFile], extra: dict[str, Any],
             metadata: dict[str, str]) -> ModelFile:
    infos = {f"{component}/{key}": TensorInfo(f"{component}/{key}", info.dtype, info.shape)
             for component, model in components.items() for key, info in model.infos.items()}

    def load(name: str) -> "torch.Tensor":
        component, key = name.split("/", 1)
        return components[component].load(key)

    def span(name: str) -> "ByteSpan | None":
        component, key = name.split("/", 1)
        return components[component].span(key)

    return ModelFile(path=folder, format="diffusers", infos=infos, metadata=metadata, extra=extra,
                     components=components,
                     size_bytes=sum(m.size_bytes for m in components.values()), _loader=load, _spanner=span)


def _open_all(folder: Path, names: list[str], open_file: OpenFile) -> dict[str, ModelFile]:
    components: dict[str, ModelFile] = {}
    try:
        for name in names:
            weights = find_weights(folder / name)
            if weights is not None:
                components[name] = _open_weights(weights, open_file)
    except BaseException:
        for opened in components.values():
            opened.close()
        raise
    return components


def open_pipeline_folder(folder: Path, open_file: OpenFile) -> ModelFile:
    """A folder with model_index.json: every listed component with weights is opened."""
    model_index = read_json(folder / "model_index.json")
    names = _listed_components(folder, model_index)
    configs = {name: _read_config(folder / name) for name in names}
    components = _open_all(folder, names, open_file)
    metadata = {key: str(value) for key, value in model_index.items()
                if isinstance(value, (str, int, float, bool))}
    extra = {"model_index": model_index,
             "configs": {name: config for name, config in configs.items() if config is not None}}
    return _combine(folder, components, extra, metadata)


def open_component_folder(folder: Path, open_file: OpenFile) -> ModelFile:
    """A lone component folder (config.json + weights): one component named after the folder."""
    name = folder.resolve().name
    config = read_json(folder / "config.json")
    weights = find_weights(folder)
    if weights is None:
        raise SdkitError(f"{folder}: component folder without weights")
    components = {name: _open_weights(weights, open_file)}
    metadata = {"_class_name": str(config["_class_name"])} \
        if isinstance(config, dict) and "_class_name" in config else {}
    return _combine(folder, components, {"model_index": None, "configs": {name: config}}, metadata)
