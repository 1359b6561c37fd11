"""Files of a library by name, as the WebUIs list them.

A name is a file's stem (`style` for `models/Lora/sdxl/style.safetensors`), its file name,
or the end of its indexed path with or without the suffix (`sdxl/style`,
`models/Lora/sdxl/style.safetensors`). Exact spelling first, then regardless of case. A
name several files answer to is refused with the candidates listed; where the command
says which kinds it takes, files of other kinds give way first.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from sdkit.errors import SdkitError
from sdkit.hub.library.index import Entry
from sdkit.hub.library.library import Library


def _answers_to(key: str, name: str) -> bool:
    path = PurePosixPath(key)
    without_suffix = path.with_suffix("").as_posix()
    return name in (path.stem, path.name, key, without_suffix) or \
        key.endswith("/" + name) or without_suffix.endswith("/" + name)


def entries_named(library: Library, name: str, kinds: tuple[str, ...] = ()) -> list[Entry]:
    """The indexed files on disk that answer to `name`, narrowed to `kinds` where that
    leaves any."""
    wanted = name.replace("\\", "/").strip("/")
    entries = [e for e in library.index.entries() if (library.root / e.path).is_file()]
    found = [e for e in entries if _answers_to(e.path, wanted)] or \
        [e for e in entries if _answers_to(e.path.casefold(), wanted.casefold())]
    of_kind = [e for e in found if e.kind in kinds]
    return of_kind if kinds and of_kind else found


def resolve_name(library: Library, name: str, kinds: tuple[str, ...] = ()) -> Path | None:
    """The one file `name` stands for; None when no file answers to it."""
    found = entries_named(library, name, kinds)
    if len(found) > 1:
        raise SdkitError(f"{name}: {len(found)} files in the library {library.root} have that name: "
                         f"{', '.join(e.path for e in found)}; give one of these paths")
    return library.root / found[0].path if found else None
