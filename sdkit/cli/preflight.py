"""Checks a command makes before it imports torch or diffusers (seconds to tens of seconds).

A command that will be refused for a path or an option that needs no model to judge
(an input that is not there, an output folder that is missing or read-only, an output
that exists, the wrong output suffix) says so at once. The library functions make the
same checks again for their other callers; these only come first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from sdkit.errors import SdkitError
from sdkit.io.output_path import check_output_path

PathLike = str | os.PathLike[str]
SAFETENSORS = (".safetensors", ".sft")  # the suffixes the safetensors writers accept


def require_inputs(*paths: PathLike | None) -> None:
    """Refuse the first of `paths` (None: not given) that does not exist."""
    for path in paths:
        if path is not None and not os.path.exists(path):
            raise SdkitError(f"{path}: no such file or directory")


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

