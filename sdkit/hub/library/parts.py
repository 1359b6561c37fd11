"""The text encoders and VAE of a lone diffusion model, found in the user's library.

A diffusion model kept alone (ComfyUI's `models/diffusion_models`) runs with separate
files: the family says which (`arch.part_fit`). Those not given on the command line are
looked for among the library's files of that kind: those in the WebUI's folders of the
kind (ComfyUI's `text_encoders` and legacy `clip`, `vae`; A1111 / Forge's `text_encoder`,
`VAE`) and the folders it is told about, and those its index files under the kind. Each candidate's header says whether it has the right design. Where several fit,
the one of the widest dtype is chosen (a T5-XXL in fp16 before its fp8 cast), then the
first by path, and the line naming it says how to choose another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdkit.arch.identity import Identity
from sdkit.arch.part_fit import NeededPart, needed_parts, takes_parts, value_bytes
from sdkit.errors import SdkitError, with_article
from sdkit.hub.library.folders import ModelFolder
from sdkit.hub.library.layouts import Layout, detect_layout
from sdkit.hub.library.library import Library, index_path, model_folders_of
from sdkit.hub.library.scan import MODEL_SUFFIXES


@dataclass
class ChosenParts:
    """The part files a diffusion model runs with: given, or found in the library."""

    vae: Path | None = None
    text_encoders: list[Path] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # one per file found in the library


@dataclass
class _Candidate:
    path: Path
    identity: Identity


def choose_parts(model: Path, vae: Path | None, text_encoders: list[Path], library: Path | None,
                 families: tuple[str, ...]) -> ChosenParts:
    """`vae` and `text_encoders` completed from `library` with the parts a lone diffusion
    model of one of `families` (those the caller loads from parts) still lacks; other
    models' parts as given."""
    chosen = ChosenParts(vae, list(text_encoders))
    identity = _identity_of(model)
    if identity is None or identity.family not in families or not takes_parts(identity):
        return chosen
    missing = _missing(needed_parts(identity), vae, text_encoders)
    if not missing:
        return chosen
    if library is None:
        names = ", ".join(part.name for part in missing)
        raise SdkitError(f"{model}: is {with_article(identity.part)}; it runs with {names}: pass them as files "
                         "(--text-encoder, --vae) or name a library to find them in (sdkit --library DIR or "
                         "$SDKIT_LIBRARY)")
    shelves = _Shelves(library)
    for part in missing:
        path, line = shelves.choose(part)
        chosen.lines.append(line)
        if part.kind == "vae":
            chosen.vae = path
        else:
            chosen.text_encoders.append(path)
    return chosen


def _identity_of(path: Path) -> Identity | None:
    from sdkit.arch import identify
    from sdkit.io import open_model

    if not path.exists():
        return None  # the loader says so in its own words
    with open_model(path) as model:
        return identify(model)


def _readable_identity(path: Path) -> Identity | None:
    """What the file is; None for a file that cannot be read as a model (no candidate)."""
    try:
        return _identity_of(path)
    except Exception:  # noqa: BLE001 - one odd file in a library of thousands
        return None


def _missing(needed: list[NeededPart], vae: Path | None, text_encoders: list[Path]) -> list[NeededPart]:
    """The needed parts no given file is: a given text encoder takes the first part it fits
    (one that fits none takes the first encoder left, so the loader names the mismatch)."""
    left = [part for part in needed if not (part.kind == "vae" and vae is not None)]
    for path in text_encoders:
        encoders = [part for part in left if part.kind == "text-encoder"]
        identity = _identity_of(path)
        fitting = [part for part in encoders if identity is not None and part.fits(identity)]
        if fitting or encoders:
            left.remove((fitting or encoders)[0])
    return left


class _Shelves:
    """A library's files by kind, each identified from its header when first asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        if not self.root.is_dir():
            raise SdkitError(f"{root}: the library must be a folder")
        self.indexed = index_path(self.root).is_file()
        self.layout = self._layout()
        if self.layout is None and not self.indexed:
            from sdkit.hub.library.library import _not_a_library

            raise SdkitError(_not_a_library(self.root))
        self.configured: list[ModelFolder] = model_folders_of(self.root)
        self._kinds: dict[str, list[_Candidate]] = {}

    def _layout(self) -> Layout | None:
        if not self.indexed:
            return detect_layout(self.root)
        with Library.open_existing(self.root) as library:
            return library.layout

    def choose(self, part: NeededPart) -> tuple[Path, str]:
        """The file for `part` and the line that says so."""
        fitting = [c for c in self._candidates(part.kind) if part.fits(c.identity)]
        if not fitting:
            raise SdkitError(f"no {part.title} ({part.design}) in the library {self.root} "
                             f"({self._where(part.kind)}); pass {part.option} FILE")
        fitting.sort(key=lambda c: (-value_bytes(c.identity), str(c.path)))
        line = f"{part.title}: {fitting[0].path} (from the library)"
        if len(fitting) > 1:
            line += f"; {len(fitting)} files fit, pass {part.option} FILE to use another"
        return fitting[0].path, line

    def _candidates(self, kind: str) -> list[_Candidate]:
        if kind not in self._kinds:
            found = [_Candidate(path, identity) for path in self._files(kind)
                     if (identity := _readable_identity(path)) is not None]
            self._kinds[kind] = found
        return self._kinds[kind]

    def _files(self, kind: str) -> list[Path]:
        """The files in the folders of `kind`, then those the index files under `kind` elsewhere."""
        found: list[Path] = []
        for folder in self._folders(kind):
            if folder.is_dir():
                found += sorted(p for p in folder.rglob("*") if p.suffix.lower() in MODEL_SUFFIXES and p.is_file())
        if self.indexed:
            with Library.open_existing(self.root) as library:
                found += [self.root / entry.path for entry in library.index.entries(kind=kind)]
        return [path for path in dict.fromkeys(found) if path.is_file()]

    def _folders(self, kind: str) -> list[Path]:
        own = [self.root / folder for folder in self.layout.folders_of_kind(kind)] if self.layout else []
        return own + [folder.path for folder in self.configured if folder.kind == kind]

    def _where(self, kind: str) -> str:
        """Where files of `kind` were looked for, in words."""
        folders = [f.relative_to(self.root).as_posix() if f.is_relative_to(self.root) else str(f)
                   for f in self._folders(kind)]
        indexed = [f"its indexed {kind} files"] if self.indexed else []
        return ", ".join(folders + indexed)
