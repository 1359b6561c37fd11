"""The two hashes a merge records per input, computed for all inputs at once.

The recipe needs each input's sha256 (and the webui's legacy hash) before the output's
header is written. Only these are computed — one sha256 pass per file — and the inputs
are hashed in parallel threads (hashlib releases the GIL), which matters when inputs are
several gigabytes each.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sdkit.errors import SdkitError
from sdkit.io.model_file import ModelFile

# A1111's legacy model hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits
_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000


@dataclass(frozen=True)
class InputHashes:
    sha256: str
    legacy: str | None  # None for folders


def hash_inputs(models: Sequence[ModelFile]) -> list[InputHashes]:
    """Hashes of every input, in input order."""
    with ThreadPoolExecutor(max(1, len(models))) as pool:
        return list(pool.map(_hash_model, models))


def _hash_model(model: ModelFile) -> InputHashes:
    if model.format != "diffusers":
        return InputHashes(_file_sha256(Path(model.path)), _legacy_hash(Path(model.path)))
    # a folder: sha256 of its components' weight-file sha256s (for a sharded component,
    # of its index file), by component name
    digest = hashlib.sha256()
    for component, part in sorted(model.components.items()):
        digest.update(f"{component}:{_file_sha256(Path(part.path))}\n".encode())
    return InputHashes(digest.hexdigest(), None)


def _file_sha256(path: Path) -> str:
    try:
        with open(path, "rb", buffering=0) as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as exc:
        raise SdkitError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _legacy_hash(path: Path) -> str:
    with open(path, "rb") as file:
        file.seek(_LEGACY_OFFSET)
        return hashlib.sha256(file.read(_LEGACY_LENGTH)).hexdigest()[:8]
