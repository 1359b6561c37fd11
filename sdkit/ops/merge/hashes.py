"""The two hashes a merge records per input: sha256 and the webui's legacy hash.

The sha256 of a multi-gigabyte input costs a full read, so a merge does not wait for it:
each distinct input is hashed on its own thread while the output is computed and
written, a placeholder of the same length stands in the header, and the digests are
patched in before the file is renamed into place (`recipe_meta.BackgroundHash`). A
recipe that names the sha256 its inputs must have (a replay) hashes them first instead,
so a changed input is refused before any work is done.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from sdkit.io.model_file import ModelFile
from sdkit.ops.recipe_meta import BackgroundHash, file_sha256

# A1111's legacy model hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits
_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000

Progress = Callable[[int], None]


@dataclass(frozen=True)
class InputHashes:
    sha256: str  # the digest, or the placeholder of a hash still running
    legacy: str | None  # None for folders


def hash_inputs(models: Sequence[ModelFile]) -> list[InputHashes]:
    """Hashes of every input, in input order, computed now (in parallel threads)."""
    running = start_hashes(models)
    return [InputHashes(running[i].digest(), legacy_hash(model)) for i, model in enumerate(models)]


def start_hashes(models: Sequence[ModelFile]) -> list[BackgroundHash]:
    """A running hash per input; the same file given twice is hashed once."""
    by_file: dict[Path, BackgroundHash] = {}
    running = []
    for model in models:
        where = Path(model.path).resolve()
        if where not in by_file:
            by_file[where] = BackgroundHash(model.path, lambda progress, model=model: model_sha256(model, progress))
        running.append(by_file[where])
    return running


def model_sha256(model: ModelFile, progress: Progress | None = None) -> str:
    """sha256 of a file; for a diffusers folder, of its components' weight-file sha256s
    (for a sharded component, of its index file), by component name."""
    if model.format != "diffusers":
        return file_sha256(Path(model.path), progress)
    digest = hashlib.sha256()
    for component, part in sorted(model.components.items()):
        digest.update(f"{component}:{file_sha256(Path(part.path), progress)}\n".encode())
    return digest.hexdigest()


def legacy_hash(model: ModelFile) -> str | None:
    if model.format == "diffusers":
        return None
    with open(model.path, "rb") as file:
        file.seek(_LEGACY_OFFSET)
        return hashlib.sha256(file.read(_LEGACY_LENGTH)).hexdigest()[:8]
