"""The files A1111 / Forge users keep beside a model, read and written as the WebUI does.

- `<stem>.json`: A1111's extra-networks user metadata (modules/extra_networks.py reads it,
  the card editors write it with indent 4): "description", "notes", and for LoRA
  "activation text" (added to the prompt with the LoRA), "preferred weight" (a number;
  0 means "the default multiplier"), "negative text" and "sd version" ("SD1", "SD2",
  "SDXL", Forge also "Flux"; anything else is "Unknown").
- `<stem>.civitai.info`: the Civitai model-version JSON (`/api/v1/model-versions/…`), as
  the Civitai Helper extension saves it.
- the preview: A1111 (ui_extra_networks.py `find_preview`) tries, for each of png, jpg,
  jpeg, webp, gif, `<stem>.<ext>` and then `<stem>.preview.<ext>`.

`<stem>` is the model's path without its last suffix (`a.b.safetensors` -> `a.b`). Every
write goes through a hidden partial file, fsynced and renamed into place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdkit.io.output_path import write_file_atomically

PREVIEW_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")
USER_METADATA_SUFFIX = ".json"
CIVITAI_INFO_SUFFIX = ".civitai.info"
ACTIVATION_TEXT = "activation text"
PREFERRED_WEIGHT = "preferred weight"
SD_VERSION = "sd version"
# the families A1111's LoRA page names in "sd version" (Forge adds Flux)
SD_VERSIONS = {"sd1": "SD1", "sd2": "SD2", "sdxl-base": "SDXL", "flux": "Flux"}
# the first bytes of the image formats A1111 shows as previews
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF87a", "gif"),
                (b"GIF89a", "gif"))


def _beside(model: Path, suffix: str) -> Path:
    return model.with_name(model.stem + suffix)


def user_metadata_path(model: Path) -> Path:
    return _beside(model, USER_METADATA_SUFFIX)


def civitai_info_path(model: Path) -> Path:
    return _beside(model, CIVITAI_INFO_SUFFIX)


def preview_candidates(model: Path) -> list[Path]:
    """Where A1111 looks for the preview, in its order."""
    return [_beside(model, f"{middle}.{ext}") for ext in PREVIEW_EXTENSIONS for middle in ("", ".preview")]


def find_preview(model: Path) -> Path | None:
    return next((path for path in preview_candidates(model) if path.is_file()), None)


def preview_path(model: Path, extension: str) -> Path:
    """Where a downloaded preview goes: `<stem>.preview.<ext>`, as Civitai Helper saves it."""
    return _beside(model, f".preview.{extension}")


def image_extension(head: bytes) -> str | None:
    """png / jpg / gif / webp from a file's first bytes; None for anything else."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _IMAGE_MAGIC if head.startswith(magic)), None)


@dataclass
class Sidecars:
    """What lies beside one model file."""

    user_metadata: dict[str, Any] | None = None
    civitai_info: dict[str, Any] | None = None
    preview: Path | None = None
    problems: list[str] = field(default_factory=list)  # sidecars that could not be read

    def to_json(self) -> dict[str, Any]:
        return {"user_metadata": self.user_metadata,
                "civitai": civitai_summary(self.civitai_info) if self.civitai_info else None,
                "preview": str(self.preview) if self.preview else None, "problems": self.problems}

    def names(self) -> list[str]:
        """The sidecars present, in words for a table column."""
        present = (("json", self.user_metadata), ("civitai.info", self.civitai_info), ("preview", self.preview))
        return [name for name, value in present if value is not None]


def _read_json_object(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problems.append(f"{path.name}: unreadable ({exc.__class__.__name__})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name}: not a JSON object")
        return None
    return value


def read_sidecars(model: Path) -> Sidecars:
    """The sidecars of `model`; one that is not readable JSON is named in `problems`
    (A1111 skips it the same way) rather than stopping a listing."""
    problems: list[str] = []
    return Sidecars(_read_json_object(user_metadata_path(model), problems),
                    _read_json_object(civitai_info_path(model), problems), find_preview(model), problems)


def civitai_summary(info: dict[str, Any]) -> dict[str, Any]:
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    return {"model_id": info.get("modelId"), "version_id": info.get("id"), "model_name": model.get("name"),
            "version_name": info.get("name"), "base_model": info.get("baseModel"),
            "trained_words": info.get("trainedWords") or []}


def info_matches(info: dict[str, Any] | None, sha256: str) -> bool:
    """Whether a saved model-version JSON lists a file with this sha256."""
    for file in (info or {}).get("files") or []:
        hashes = file.get("hashes") if isinstance(file, dict) else None
        if isinstance(hashes, dict) and str(hashes.get("SHA256", "")).lower() == sha256.lower():
            return True
    return False


def offered_user_metadata(version: dict[str, Any], kind: str, family: str) -> dict[str, Any]:
    """What a Civitai answer says for A1111's user metadata: the trained words as
    activation text, the recommended strength (where the answer carries one) as preferred
    weight, and for a LoRA the "sd version" of the family the library settled on."""
    offered: dict[str, Any] = {}
    words = [str(word).strip() for word in version.get("trainedWords") or [] if str(word).strip()]
    if words:
        offered[ACTIVATION_TEXT] = ", ".join(words)
    strength = (version.get("settings") or {}).get("strength") if isinstance(version.get("settings"), dict) else None
    if isinstance(strength, (int, float)) and not isinstance(strength, bool) and strength > 0:
        offered[PREFERRED_WEIGHT] = float(strength)
    if kind == "lora" and family in SD_VERSIONS:
        offered[SD_VERSION] = SD_VERSIONS[family]
    return offered


def fill_missing(existing: dict[str, Any] | None, offered: dict[str, Any]) -> dict[str, Any] | None:
    """`existing` with the offered keys it lacks added (a key the user has, even empty, is
    theirs and kept); None when nothing is added."""
    merged = dict(existing or {})
    added = {key: value for key, value in offered.items() if key not in merged}
    if not added:
        return None
    merged.update(added)
    return merged


def write_json(path: Path, value: dict[str, Any]) -> Path:
    """Atomically, with the layout A1111's editor writes (indent 4, UTF-8 as is)."""
    text = json.dumps(value, indent=4, ensure_ascii=False)
    return write_file_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"), overwrite=True)


def preview_image_url(version: dict[str, Any]) -> str | None:
    """The first still image of a model version (videos are skipped)."""
    for image in version.get("images") or []:
        if isinstance(image, dict) and image.get("url") and image.get("type", "image") == "image":
            return str(image["url"])
    return None
