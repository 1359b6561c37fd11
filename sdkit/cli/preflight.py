"""Checks a command makes before it imports torch or diffusers (seconds to tens of seconds).

A command that will be refused for a path or an option that needs no model to judge
(an input that is not there, an output folder that is missing or read-only, an output
that exists, the wrong output suffix) says so at once. The library functions make the
same checks again for their other callers; these only come first.

Input files are also where library names become paths: an argument of type `ModelInput`
that names no file on disk, while a library is configured (`sdkit --library DIR` or
$SDKIT_LIBRARY), is looked up by name in that library's index as it is parsed, so every
command takes `style` for `models/Lora/style.safetensors` in the same way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import click

from sdkit.errors import SdkitError
from sdkit.io.output_path import check_output_path

PathLike = str | os.PathLike[str]
SAFETENSORS = (".safetensors", ".sft")  # the suffixes the safetensors writers accept
LIBRARY_ENV = "SDKIT_LIBRARY"
MODEL_KINDS = ("checkpoint", "unet")


def configured_library() -> Path | None:
    """`sdkit --library DIR`, else $SDKIT_LIBRARY; None when neither is set."""
    ctx = click.get_current_context(silent=True)
    given = (ctx.find_root().obj or {}).get("library") if ctx is not None else None
    if given:
        return Path(given)
    return Path(os.environ[LIBRARY_ENV]) if os.environ.get(LIBRARY_ENV) else None


def resolve_input(text: str, kinds: tuple[str, ...] = (), *, strength: bool = False) -> str:
    """`text` itself when it names a file (or no library is configured), else the path of
    the library file of that name; `FILE[:STRENGTH]` keeps its strength."""
    from sdkit.ops.adapter_input import parse_adapter_arg

    name = parse_adapter_arg(text).path if strength else text
    root = configured_library()
    if root is None or os.path.exists(name):
        return text
    from sdkit.hub.library import Library
    from sdkit.hub.library.names import resolve_name

    with Library.open_existing(root) as library:
        found = resolve_name(library, name, kinds)
    return text if found is None else str(found) + text[len(name):]


class ModelInput(click.ParamType):
    """A model file (or folder) path, or a file's name in the configured library."""

    name = "path"

    def __init__(self, *kinds: str, strength: bool = False, as_path: bool = False) -> None:
        self.kinds = kinds
        self.strength = strength
        self.as_path = as_path  # hand the command a Path, not a str

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str | Path:
        resolved = resolve_input(os.fspath(value) if isinstance(value, os.PathLike) else str(value),
                                 self.kinds, strength=self.strength)
        return Path(resolved) if self.as_path else resolved


def require_inputs(*paths: PathLike | None) -> None:
    """Refuse the first of `paths` (None: not given) that does not exist."""
    for path in paths:
        if path is not None and not os.path.exists(path):
            library = configured_library()
            beyond = f", nor a file of that name in the library {library}" if library else ""
            raise SdkitError(f"{path}: no such file or directory{beyond}")


def require_output(output: PathLike, inputs: Iterable[PathLike | None] = (), *, force: bool,
                   suffixes: tuple[str, ...] | None = None) -> Path:
    """Refuse an output path that cannot be written: a suffix not in `suffixes` (None: any,
    folders included), a parent folder that is missing or refuses new files, an existing
    file or one of `inputs` without `force`."""
    path = Path(output)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise SdkitError(f"{path}: the output's name must end in {' or '.join(suffixes)}")
    folder = path.parent
    if not folder.is_dir():
        raise SdkitError(f"{folder}: no such folder for the output")
    check_output_path(path, inputs, force=force)
    _require_writable(folder)
    return path


def _require_writable(folder: Path) -> None:
    # creating a file is the only test that knows about read-only mounts, immutable
    # folders, ACLs and root alike; an unnamed temporary file leaves nothing behind
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise SdkitError(f"{folder}: cannot write there: {exc.strerror or exc}") from None

