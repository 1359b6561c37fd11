"""Adapter files by name, as the WebUIs find them in their model folders.

A library root is searched in the A1111 layout (`models/Lora`, `models/LyCORIS`,
`models/hypernetworks`, `embeddings`, `models/VAE`) and in ComfyUI's (`models/loras`,
`models/hypernetworks`, `models/embeddings`, `models/vae`), subfolders included, as both
WebUIs list them, then in the folders the WebUI is told about (ComfyUI's
extra_model_paths.yaml, A1111's `--lora-dir` … in webui-user, folders given to `library
scan`). A name is a file stem (`style` for `models/Lora/sdxl/style.safetensors`) or a path
below the kind's folder without suffix (`sdxl/style`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sdkit.errors import SdkitError
from sdkit.hub.library.folders import ModelFolder
from sdkit.hub.library.layouts import A1111, COMFYUI
from sdkit.hub.library.library import model_folders_of

MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
KINDS = ("lora", "hypernetwork", "embedding", "vae")
# LyCORIS files had their own folder before A1111 read them from models/Lora
_EXTRA_FOLDERS = {"lora": ("models/LyCORIS",)}


def kind_folders(kind: str) -> tuple[str, ...]:
    """Folders (relative to a library root) that hold files of `kind`, A1111's first."""
    folders = [A1111.folders[kind], *_EXTRA_FOLDERS.get(kind, ()), COMFYUI.folders[kind]]
    return tuple(dict.fromkeys(folders))


@dataclass
class Library:
    root: Path
    _files: dict[str, list[Path]] = field(default_factory=dict, repr=False, compare=False)
    _configured: list[ModelFolder] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.root.is_dir():
            raise SdkitError(f"{self.root}: --library must be a folder")

    def folders(self, kind: str) -> list[Path]:
        """The folders holding files of `kind`: the layouts' under the root, then the configured ones."""
        if self._configured is None:
            self._configured = model_folders_of(self.root)
        return [self.root / folder for folder in kind_folders(kind)] + \
            [folder.path for folder in self._configured if folder.kind == kind]

    def files(self, kind: str) -> list[Path]:
        """Every model file of `kind`, in folder order then sorted by path (listed once)."""
        if kind not in self._files:
            found: list[Path] = []
            for base in self.folders(kind):
                if base.is_dir():
                    found += sorted(p for p in base.rglob("*")
                                    if p.suffix.lower() in MODEL_SUFFIXES and p.is_file())
            self._files[kind] = found
        return self._files[kind]

    def find(self, kind: str, name: str) -> Path | None:
        wanted = name.replace("\\", "/").lower()
        for path in self.files(kind):
            relative = _relative_stem(self.folders(kind), path)
            if path.stem.lower() == wanted or relative == wanted:
                return path
        return None

    def names(self, kind: str) -> dict[str, Path]:
        """stem -> file (the first file of each stem)."""
        named: dict[str, Path] = {}
        for path in self.files(kind):
            named.setdefault(path.stem, path)
        return named


def _relative_stem(folders: list[Path], path: Path) -> str | None:
    for folder in folders:
        try:
            relative = path.relative_to(folder)
        except ValueError:
            continue
        return relative.with_suffix("").as_posix().lower()
    return None


def resolve_file(text: str, kind: str, library: Library | None, mention: str | None = None) -> Path:
    """A file given by path, or by name in the library; one-line error when neither."""
    path = Path(os.path.expanduser(text))
    if path.exists():
        return path
    where = mention or text
    if library is None:
        raise SdkitError(f"{where}: no such file (pass --library DIR to find {kind} files by name)")
    found = library.find(kind, text)
    if found is None:
        folders = ", ".join(f.relative_to(library.root).as_posix() if f.is_relative_to(library.root) else str(f)
                            for f in library.folders(kind))
        raise SdkitError(f"{where}: no {kind} named {text!r} in {library.root} ({folders})")
    return found
