"""Model folders a WebUI is told about beyond its own tree.

- ComfyUI reads `extra_model_paths.yaml` beside its main.py (utils/extra_config.py): every
  top-level section maps folder names (`checkpoints`, `loras`, `vae`, …; the legacy `unet`
  and `clip` mean `diffusion_models` and `text_encoders`) to paths, one per line of the
  value. A section's `base_path` (`~` and `$VARS` expanded, relative to the yaml's folder)
  is joined before each path; without it a relative path is relative to the yaml's
  folder. `is_default: true` puts the section's folders first, where ComfyUI saves and
  looks first; otherwise they come after its own.
- A1111 / Forge take `--ckpt-dir`, `--lora-dir`, `--vae-dir`, `--embeddings-dir`,
  `--hypernetwork-dir` (Forge also `--text-encoder-dir`, `--controlnet-dir`; A1111
  `--lyco-dir-backcompat`) on the command line, usually in the `COMMANDLINE_ARGS` line of
  `webui-user.sh` / `webui-user.bat`. A relative path is relative to the WebUI folder,
  where the launcher runs.

Folder names that hold no model kind sdkit files (`configs`, `custom_nodes`, …) are left out.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdkit.errors import SdkitError

EXTRA_MODEL_PATHS = "extra_model_paths.yaml"
WEBUI_USER_FILES = ("webui-user.sh", "webui-user.bat")
COMFYUI_FOLDER_KINDS = {
    "checkpoints": "checkpoint", "diffusion_models": "unet", "unet": "unet",
    "text_encoders": "text-encoder", "clip": "text-encoder", "vae": "vae", "loras": "lora",
    "embeddings": "embedding", "hypernetworks": "hypernetwork", "controlnet": "controlnet",
    "t2i_adapter": "controlnet", "upscale_models": "upscaler", "clip_vision": "image-encoder",
}
WEBUI_DIR_FLAGS = {
    "--ckpt-dir": "checkpoint", "--lora-dir": "lora", "--lyco-dir-backcompat": "lora",
    "--vae-dir": "vae", "--embeddings-dir": "embedding", "--hypernetwork-dir": "hypernetwork",
    "--text-encoder-dir": "text-encoder", "--controlnet-dir": "controlnet",
}
_EARLIER_VALUE = re.compile(r"%COMMANDLINE_ARGS%|\$\{?COMMANDLINE_ARGS\}?")
_COMMANDLINE_ARGS = re.compile(r"^\s*(?:export\s+|set\s+)?\"?COMMANDLINE_ARGS=(.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class ModelFolder:
    """One folder a WebUI reads files of `kind` from, outside or inside its tree."""

    kind: str
    path: Path           # absolute and normalized
    is_default: bool = False
    origin: str = ""     # where it was configured, for people: "extra_model_paths.yaml", "--lora-dir"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "is_default": self.is_default, "origin": self.origin}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ModelFolder:
        return cls(value["kind"], Path(value["path"]), bool(value.get("is_default")), value.get("origin", ""))


def _absolute(path: str, base: Path) -> Path:
    return Path(os.path.normpath(base / path))


def read_extra_model_paths(yaml_path: Path) -> list[ModelFolder]:
    """The model folders of a ComfyUI `extra_model_paths.yaml`."""
    import yaml

    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SdkitError(f"{yaml_path}: cannot read it as YAML ({exc.__class__.__name__})") from None
    if config is None:
        return []
    if not isinstance(config, dict):
        raise SdkitError(f"{yaml_path}: expected sections of folder names, found {type(config).__name__}")
    yaml_dir = yaml_path.resolve().parent
    folders: list[ModelFolder] = []
    for section, entries in config.items():
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise SdkitError(f"{yaml_path}: section {section!r} is not a mapping of folder names to paths")
        folders += _section_folders(yaml_path, yaml_dir, str(section), dict(entries))
    return folders


def _section_folders(yaml_path: Path, yaml_dir: Path, section: str, entries: dict[str, Any]) -> list[ModelFolder]:
    base = entries.pop("base_path", None)
    is_default = bool(entries.pop("is_default", False))
    base_dir = _absolute(os.path.expandvars(os.path.expanduser(str(base))), yaml_dir) if base else yaml_dir
    folders = []
    for name, value in entries.items():
        if not isinstance(value, str):
            raise SdkitError(f"{yaml_path}: {section}.{name} must be a path, or several on separate lines")
        kind = COMFYUI_FOLDER_KINDS.get(str(name))
        for line in value.split("\n"):
            if kind is not None and line:
                folders.append(ModelFolder(kind, _absolute(line, base_dir), is_default, EXTRA_MODEL_PATHS))
    return folders


def folders_from_webui_args(args: Iterable[str], root: Path, origin: str = "") -> list[ModelFolder]:
    """The folder flags among A1111 / Forge command-line arguments (`--lora-dir X` or
    `--lora-dir=X`); a relative path is relative to `root`."""
    folders, words = [], list(args)
    for position, word in enumerate(words):
        flag, sep, value = word.partition("=")
        if flag not in WEBUI_DIR_FLAGS:
            continue
        if not sep:
            if position + 1 >= len(words):
                raise SdkitError(f"{origin or flag}: {flag} needs a folder after it")
            value = words[position + 1]
        folders.append(ModelFolder(WEBUI_DIR_FLAGS[flag], _absolute(value, root), False, origin or flag))
    return folders


def commandline_args(script: Path) -> list[str]:
    """The arguments the last `COMMANDLINE_ARGS=` line of a `webui-user.sh` (`export`,
    shell quoting) or `webui-user.bat` (`set`, the rest of the line as it is) hands the
    WebUI, which splits them as a POSIX shell would (paths_internal.py); an earlier value
    referenced as `$COMMANDLINE_ARGS` / `%COMMANDLINE_ARGS%` is put in. [] when none is set."""
    windows = script.suffix.lower() == ".bat"
    value = ""
    for line in _logical_lines(script.read_text(encoding="utf-8", errors="replace"), "^" if windows else "\\"):
        match = _COMMANDLINE_ARGS.match(line)
        if match is None:
            continue
        raw = match.group(1).strip()
        text = raw.rstrip('"') if windows and line.lstrip().lower().startswith('set "') else raw
        text = text if windows else _shell_value(text, script)
        value = _EARLIER_VALUE.sub(value.replace("\\", "\\\\"), text)
    try:
        return shlex.split(value)
    except ValueError:
        raise SdkitError(f"{script}: cannot read its COMMANDLINE_ARGS line (unbalanced quotes?)") from None


def _logical_lines(text: str, continuation: str) -> list[str]:
    """Lines with their continuations (`^` in cmd, `\\` in sh) joined."""
    lines: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.rstrip().endswith(continuation):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return lines + ([pending] if pending else [])


def _shell_value(text: str, script: Path) -> str:
    """What the shell assigns: the quoting of `export COMMANDLINE_ARGS="…"` taken off."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        raise SdkitError(f"{script}: cannot read its COMMANDLINE_ARGS line (unbalanced quotes?)") from None
    return " ".join(words)


def webui_user_folders(root: Path) -> list[ModelFolder]:
    folders: list[ModelFolder] = []
    for name in WEBUI_USER_FILES:
        script = root / name
        if script.is_file():
            folders += folders_from_webui_args(commandline_args(script), root, name)
    return folders


def configured_folders(root: Path, layout: str | None, stored: list[ModelFolder]) -> list[ModelFolder]:
    """The folders the WebUI at `root` is told about (its own config files: ComfyUI's yaml
    for a comfyui library, webui-user for a1111) plus those given to sdkit (`stored`),
    without repeats."""
    found: list[ModelFolder] = []
    if layout == "comfyui" and (root / EXTRA_MODEL_PATHS).is_file():
        found += read_extra_model_paths(root / EXTRA_MODEL_PATHS)
    if layout == "a1111":
        found += webui_user_folders(root)
    found += stored
    unique: dict[tuple[str, Path], ModelFolder] = {}
    for folder in found:
        unique.setdefault((folder.kind, folder.path), folder)
    return list(unique.values())


def outside(root: Path, folders: Iterable[ModelFolder]) -> list[Path]:
    """The folders to walk beyond `root` (one inside `root` or inside another is walked already)."""
    paths = sorted({folder.path for folder in folders})
    kept: list[Path] = []
    for path in paths:
        if not path.is_relative_to(root) and not any(path.is_relative_to(k) for k in kept):
            kept.append(path)
    return kept
