"""`open_model`: one entry point for every model file layout sdkit reads."""

from __future__ import annotations

import os
from pathlib import Path

from sdkit.errors import SdkitError
from sdkit.io.diffusers_folder import (is_component_folder, open_component_folder,
                                       open_pipeline_folder)
from sdkit.io.model_file import ModelFile
from sdkit.io.safetensors_reader import SAFETENSORS_SUFFIXES, open_safetensors

# sdkit.io.gguf_reader's GGUF_MAGIC and GGUF_SUFFIXES, repeated so that opening any other
# file does not import that module (it loads numpy and the gguf package)
_GGUF_MAGIC = b"GGUF"
_GGUF_SUFFIXES = (".gguf",)


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as file:
        return file.read(len(magic)) == magic


def open_file(path: Path) -> ModelFile:
    """A single weights file, chosen by its magic bytes (GGUF) or else by its suffix."""
    suffix = path.suffix.lower()
    if suffix in _GGUF_SUFFIXES or _starts_with(path, _GGUF_MAGIC):
        from sdkit.io.gguf_reader import open_gguf

        return open_gguf(path)
    if suffix in SAFETENSORS_SUFFIXES:
        return open_safetensors(path)
    # the restricted unpickler (zipfile, pickle) is imported for pickles only
    from sdkit.io.torch_checkpoint import PICKLE_SUFFIXES, open_checkpoint

    if suffix in PICKLE_SUFFIXES:
        return open_checkpoint(path)
    raise SdkitError(f"{path}: unrecognised model file (expected .safetensors, .sft, .gguf, "
                     ".ckpt, .pt, .pth, .bin or a diffusers folder)")


def open_folder(path: Path) -> ModelFile:
    if (path / "model_index.json").is_file():
        return open_pipeline_folder(path, open_file)
    if is_component_folder(path):
        return open_component_folder(path, open_file)
    raise SdkitError(f"{path}: unrecognised model folder (no model_index.json, and no "
                     "config.json with weights)")


def open_model(path: str | os.PathLike[str]) -> ModelFile:
    """Open a model file or folder; tensors load lazily, bad input raises SdkitError.

    `.safetensors`/`.sft`: header only, tensors memory-mapped on load.
    `.ckpt .pt .pth .bin`: restricted unpickling (no code runs), storages mapped on load.
    `.gguf` (or any file starting with the GGUF magic): header through the gguf package;
    quantized tensors dequantized to float32 on load.
    Folders: diffusers pipelines (`model_index.json`) or one component folder.
    """
    path = Path(path)
    try:
        if path.is_dir():
            return open_folder(path)
        if not path.exists():
            raise SdkitError(f"{path}: no such file or directory")
        return open_file(path)
    except OSError as exc:  # unreadable file, vanished mid-way, I/O error
        raise SdkitError(f"{exc.filename or path}: cannot read: {exc.strerror or exc}") from None
