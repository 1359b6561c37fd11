"""The metadata every file sdkit writes carries: ModelSpec and the `sdkit.recipe`.

- `modelspec.*` (Stability AI's model spec 1.0.1): the MUST fields `sai_model_spec`,
  `architecture` (from the family table), `implementation`, `title`, `resolution`, and
  `prediction_type` when known; `date` (when the file was made, UTC) and `hash_sha256`
  ("0x" + sha256 of the data section, filled in by the writer). Descriptive fields the
  input already had (author, description, license, tags, trigger phrase, ...) are
  carried over.
- `sdkit.recipe`: JSON with the operation, the inputs (file names) with their sha256, the
  parameters and the sdkit version, so the output can be made again from its own
  metadata.
- `format: pt`, which transformers requires of the safetensors files it loads.

Keys that describe the input's bytes rather than the model (`modelspec.hash_sha256`,
`modelspec.date`, kohya's `sshs_*` addnet hashes, an earlier `sdkit.recipe`) are not
carried: they would be wrong for the output. `SOURCE_DATE_EPOCH` (seconds) fixes the date,
so the same command can give the same bytes.

Inputs are recorded by file name, as kohya records them: where a user keeps their files
is nobody else's business once the file is shared. `full_paths_recorded()` (the CLI's
`--record-paths`) records absolute paths instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from sdkit import __version__
from sdkit.arch.families import FAMILIES, default_resolution, modelspec_architecture
from sdkit.errors import SdkitError
from sdkit.io.writer import DATA_SHA256

RECIPE_KEY = "sdkit.recipe"
SPEC_VERSION = "1.0.1"
STABILITY_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
# LDM single-file key names follow these codebases (sd-scripts writes the same strings)
LDM_IMPLEMENTATIONS = {
    "sd1": "https://github.com/CompVis/stable-diffusion",
    "sd2": "https://github.com/Stability-AI/stablediffusion",
    "sdxl-base": STABILITY_IMPLEMENTATION,
    "sdxl-refiner": STABILITY_IMPLEMENTATION,
    "playground-v2.5": STABILITY_IMPLEMENTATION,
}
DIFFUSERS_IMPLEMENTATION = "diffusers"
# sd-scripts writes generative-models for every embedding and every fine-tuned single file
# (`sai_model_spec.determine_implementation`), whatever the family
EMBEDDING_IMPLEMENTATION = CHECKPOINT_TRAINING_IMPLEMENTATION = STABILITY_IMPLEMENTATION
_STALE_KEYS = ("modelspec.hash_sha256", "modelspec.date", "sshs_model_hash", "sshs_legacy_hash",
               RECIPE_KEY, "modelspec.sai_model_spec")
_FOLDER_FILES = (".safetensors", ".bin", ".json", ".txt", ".model")
_CHUNK_BYTES = 16 << 20

Progress = Callable[[int], None]

_FULL_PATHS: ContextVar[bool] = ContextVar("sdkit_full_paths", default=False)


@contextmanager
def full_paths_recorded(enabled: bool = True) -> Iterator[None]:
    """Within the block, metadata records inputs by absolute path instead of file name."""
    token = _FULL_PATHS.set(enabled)
    try:
        yield
    finally:
        _FULL_PATHS.reset(token)


def recorded_path(path: str | os.PathLike[str]) -> str:
    """How metadata names an input file or folder: its name (absolute path if asked)."""
    given = Path(path)
    return str(given.absolute()) if _FULL_PATHS.get() else given.name


def modelspec_date() -> str:
    """ModelSpec's `date`: now in UTC, ISO-8601 to the second; `SOURCE_DATE_EPOCH` wins."""
    fixed = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    seconds = int(fixed) if fixed.isdigit() else int(time.time())
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


@dataclass(frozen=True)
class SpecFacts:
    """What ModelSpec needs to know about the model an output holds.

    `family` is a key of FAMILIES (or "unknown"); `adapter` the ModelSpec suffix for
    adapters and parts ("lora", "textual-inversion", "vae"); `implementation` overrides
    the family's LDM codebase (e.g. "diffusers" for a diffusers-layout output).
    `resolution`: the side in pixels the model draws at when known (from its config);
    otherwise the family's, except for a model of non-standard dimensions, whose size the
    family does not tell (a tiny test model), where the field is left out.
    """

    family: str = "unknown"
    variant: str = "normal"
    prediction: str = "unknown"
    adapter: str | None = None
    implementation: str | None = None
    resolution: int | None = None
    nonstandard: bool = False

    @classmethod
    def from_identity(cls, identity: Any, **changes: Any) -> "SpecFacts":
        """Facts from an `sdkit.arch.Identity` (kind, family, variant, prediction)."""
        facts = {"family": identity.family, "variant": identity.variant,
                 "prediction": identity.prediction, "nonstandard": identity.nonstandard}
        facts.update(changes)
        return cls(**facts)


def file_sha256(path: Path, progress: Progress | None = None) -> str:
    """sha256 of a file's bytes (one digest only: cheaper than `hash_file`'s set), from
    the hash cache when it knows the file as it is now (`progress` then gets its size at
    once; see `sdkit.io.hash_cache`)."""
    from sdkit.io.hash_cache import remembered_digests

    def read() -> dict[str, str]:
        digest = hashlib.sha256()
        buffer = bytearray(_CHUNK_BYTES)
        view = memoryview(buffer)
        try:
            with open(path, "rb", buffering=0) as file:
                while count := file.readinto(buffer):
                    digest.update(view[:count])  # releases the GIL: runs beside the writer
                    if progress is not None:
                        progress(count)
        except OSError as exc:
            raise SdkitError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return {"sha256": digest.hexdigest()}

    return remembered_digests(path, ("sha256",), read, progress)["sha256"]


def input_sha256(path: str | os.PathLike[str], progress: Progress | None = None) -> str:
    """sha256 of a file; for a folder, of its files' relative names and sha256s."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path, progress)
    folder = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _FOLDER_FILES):
        relative = file.relative_to(path).as_posix()
        folder.update(f"{relative}:{file_sha256(file, progress)}\n".encode())
    return folder.hexdigest()


class _Cancelled(Exception):
    """Ends a background hash early."""


class BackgroundHash:
    """An input's sha256 computed in a thread while outputs are written.

    `placeholder` (64 random hex digits, as long as a sha256) stands in the outputs'
    metadata; `patch(file)` writes the real digest over it in the file's header once the
    hash is done, before the file is renamed into place. Same header length, so the
    safetensors file stays valid.
    """

    def __init__(self, path: str | os.PathLike[str],
                 compute: Callable[[Progress], str] | None = None) -> None:
        """Hash `path` with `input_sha256`, or with `compute(progress)` when given (a
        digest of another definition; it must call `progress` as it reads, which is
        where a cancelled hash stops)."""
        self.placeholder = secrets.token_hex(32)
        self._stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=1)
        if compute is None:
            self._future = pool.submit(input_sha256, path, self._check)
        else:
            self._future = pool.submit(compute, self._check)
        pool.shutdown(wait=False)

    def _check(self, count: int) -> None:
        if self._stop.is_set():
            raise _Cancelled

    def cancel(self) -> None:
        """Stop hashing (the conversion failed; nobody will ask for the digest)."""
        self._stop.set()

    def digest(self) -> str:
        return self._future.result()

    def patch(self, file: Path) -> None:
        """Replace the placeholder in `file`'s safetensors header with the digest."""
        from sdkit.io.writer import patch_header

        patch_header(file, self.placeholder, self.digest())


class InputDigests:
    """The sha256 of several inputs, each hashed on its own thread while the output is
    written: `placeholders` go into `build_metadata(hashes=...)`, `patch` is the writer's
    `finish`, and leaving the `with` block stops hashes nobody will ask for."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        self.paths = [str(path) for path in paths]  # as given, repeats kept (for the recipe)
        self.running = {path: BackgroundHash(path) for path in dict.fromkeys(self.paths)}

    @property
    def placeholders(self) -> dict[str, str]:
        return {path: running.placeholder for path, running in self.running.items()}

    def digest(self, path: str | os.PathLike[str]) -> str:
        return self.running[str(path)].digest()

    def patch(self, file: Path) -> None:
        for running in self.running.values():
            running.patch(file)

    def __enter__(self) -> "InputDigests":
        return self

    def __exit__(self, *exc: object) -> None:
        for running in self.running.values():
            running.cancel()


def recipe_json(operation: str, inputs: Sequence[str | os.PathLike[str]], params: Mapping[str, Any],
                hashes: Mapping[str, str] | None = None, progress: Progress | None = None) -> str:
    """The `sdkit.recipe` value: operation, inputs with sha256, parameters, sdkit version.

    `hashes` maps input paths (as given) to sha256s already known; others are computed.
    """
    known = dict(hashes or {})
    records = [{"path": recorded_path(path),
                "sha256": known.get(str(path)) or input_sha256(path, progress)}
               for path in inputs]
    return json.dumps({"operation": operation, "inputs": records, "parameters": dict(params),
                       "sdkit_version": __version__}, sort_keys=True, default=str)


def modelspec(facts: SpecFacts, title: str) -> dict[str, str]:
    """The ModelSpec fields sdkit knows for a model with these facts (no architecture
    for an unknown family: the caller keeps what the input said, or writes "unknown")."""
    family = facts.family if facts.family in FAMILIES else None
    prediction = facts.prediction if facts.prediction in ("epsilon", "v") else "epsilon"
    architecture = None
    if family is not None:
        architecture = modelspec_architecture(family, variant=facts.variant, prediction=prediction,
                                              adapter=facts.adapter)
        if architecture is None:  # a family the spec has no string for (Kolors, Playground)
            architecture = f"{family}/{facts.adapter}" if facts.adapter else family
    spec = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.implementation": facts.implementation or LDM_IMPLEMENTATIONS.get(facts.family)
        or (FAMILIES[family].implementation if family else None) or DIFFUSERS_IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.date": modelspec_date(),
        "modelspec.hash_sha256": DATA_SHA256,
    }
    if architecture is not None:
        spec["modelspec.architecture"] = architecture
    side = facts.resolution
    if side is None and family is not None and not facts.nonstandard:
        side = default_resolution(family, prediction=prediction)
    if side is not None:
        spec["modelspec.resolution"] = f"{side}x{side}"
    if facts.prediction in ("epsilon", "v"):
        spec["modelspec.prediction_type"] = facts.prediction
    return spec


def carried_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """An input's metadata without the keys that describe the input's own bytes."""
    return {key: value for key, value in metadata.items() if key not in _STALE_KEYS}


def spec_facts(described: "SpecFacts | Any | str | None") -> SpecFacts:
    """SpecFacts from SpecFacts, an `sdkit.arch.Identity`, a family name, or nothing."""
    if isinstance(described, SpecFacts):
        return described
    if isinstance(described, str):
        return SpecFacts(family=described)
    if described is None:
        return SpecFacts()
    return SpecFacts.from_identity(described)


def build_metadata(operation: str, inputs: Sequence[str | os.PathLike[str]], params: Mapping[str, Any],
                   facts: SpecFacts | Any | str | None = None, extra: Mapping[str, str] | None = None, *,
                   title: str | None = None, carried: Mapping[str, str] | None = None,
                   hashes: Mapping[str, str] | None = None,
                   progress: Progress | None = None) -> dict[str, str]:
    """All metadata of an output file, as str -> str.

    `facts` describes the output model: SpecFacts, an Identity or a family name. `title`
    defaults to the first input's name. Precedence, lowest first: `carried` (the input's
    metadata, stale keys removed), the computed ModelSpec (the input's own title wins over
    `title`, its own resolution over the family's), `extra`, the recipe.
    """
    metadata = {"format": "pt"}
    metadata.update(carried_metadata(carried or {}))
    described = spec_facts(facts)
    spec = modelspec(described, title or (Path(inputs[0]).stem if inputs else "untitled"))
    carried = carried or {}
    if carried.get("modelspec.title"):
        spec["modelspec.title"] = carried["modelspec.title"]
    if carried.get("modelspec.resolution") and described.resolution is None:
        spec["modelspec.resolution"] = carried["modelspec.resolution"]  # the input knew its size
    metadata.update(spec)
    metadata.setdefault("modelspec.architecture", "unknown")
    metadata.update(extra or {})
    metadata[RECIPE_KEY] = recipe_json(operation, inputs, params, hashes, progress)
    return metadata
