"""Training pictures and their captions: found, filtered, counted.

A data folder holds images (searched recursively, hidden folders skipped) and their
captions, taken from the first of:
- `metadata.jsonl` (one `{"file_name": ..., "text": ...}` per line) or `metadata.csv`
  (columns `file_name` and `text` or `caption`), the Hugging Face imagefolder layout;
- a sidecar file beside the image with the same stem: `.txt`, else `.caption` (kohya);
- none: the caption is empty (the trigger word, if given, then stands alone).

Filters drop images smaller than a minimum width / height or outside an aspect-ratio
range; every dropped file is reported with its reason, and an empty result is refused.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sdkit.errors import SdkitError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_TEXT_COLUMNS = ("text", "caption")


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str
    width: int
    height: int


@dataclass(frozen=True)
class ImageFilter:
    min_width: int = 0
    min_height: int = 0
    min_aspect: float | None = None  # width / height
    max_aspect: float | None = None

    def reason_to_drop(self, width: int, height: int) -> str | None:
        if width < self.min_width:
            return f"{width}x{height} is narrower than the minimum width {self.min_width}"
        if height < self.min_height:
            return f"{width}x{height} is lower than the minimum height {self.min_height}"
        aspect = width / height
        low = self.min_aspect if self.min_aspect is not None else 0.0
        high = self.max_aspect if self.max_aspect is not None else float("inf")
        if not low <= aspect <= high:
            return f"aspect ratio {aspect:.2f} is outside {low:g}-{high:g}"
        return None


@dataclass
class DatasetScan:
    """The images kept, the ones dropped (relative path -> why), where captions came from."""

    folder: Path
    records: list[ImageRecord]
    dropped: dict[str, str] = field(default_factory=dict)
    caption_source: str = "none"  # "metadata.jsonl" | "metadata.csv" | "sidecar" | "none"
    uncaptioned: int = 0

    def report(self) -> dict[str, object]:
        return {"folder": str(self.folder), "images": len(self.records), "dropped": dict(self.dropped),
                "caption_source": self.caption_source, "uncaptioned": self.uncaptioned}

    def listing_digest(self) -> str:
        """sha256 over every kept image's name, byte size and caption: cheap (no picture is
        read), and changed by any added, removed, resized or recaptioned picture."""
        digest = hashlib.sha256()
        for record in self.records:
            name = record.path.relative_to(self.folder).as_posix()
            digest.update(f"{name}\0{record.path.stat().st_size}\0{record.caption}\0".encode())
        return digest.hexdigest()

    def fingerprint(self) -> str:
        """sha256 over every kept image's and caption's name and bytes: what was trained on."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(record.path.relative_to(self.folder).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(record.path.read_bytes()).digest())
            digest.update(record.caption.encode() + b"\0")
        return digest.hexdigest()


def image_files(folder: Path, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """Images under `folder`, sorted; hidden folders and `exclude` (files or folders) skipped."""
    excluded = {path.resolve() for path in exclude}
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.resolve() in excluded or any(parent.resolve() in excluded for parent in path.parents):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
    return found


def _metadata_rows(path: Path) -> Iterator[tuple[str, str]]:
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise SdkitError(f"{path}: line {number} is not JSON") from None
            yield _metadata_pair(path, row, f"line {number}")
        return
    with open(path, newline="", encoding="utf-8") as file:
        for number, row in enumerate(csv.DictReader(file), start=2):
            yield _metadata_pair(path, row, f"row {number}")


def _metadata_pair(path: Path, row: object, where: str) -> tuple[str, str]:
    if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
        raise SdkitError(f"{path}: {where} has no file_name")
    text = next((row[c] for c in _TEXT_COLUMNS if isinstance(row.get(c), str)), None)
    if text is None:
        raise SdkitError(f"{path}: {where} has no text (or caption) for {row['file_name']}")
    return row["file_name"], text


def read_captions(folder: Path, images: list[Path]) -> tuple[dict[Path, str], str]:
    """(caption by image, where the captions came from)."""
    for name in METADATA_FILES:
        path = folder / name
        if path.is_file():
            captions = {(folder / file_name).resolve(): text.strip() for file_name, text in _metadata_rows(path)}
            return {image: captions[image.resolve()] for image in images if image.resolve() in captions}, name
    captions = {}
    for image in images:
        for suffix in CAPTION_SUFFIXES:
            sidecar = image.with_suffix(suffix)
            if sidecar.is_file():
                captions[image] = sidecar.read_text(encoding="utf-8").strip()
                break
    return captions, "sidecar" if captions else "none"


def image_size(path: Path) -> tuple[int, int] | str:
    """(width, height), or why the file cannot be used."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as exc:
        return f"not a readable image ({exc.__class__.__name__})"


def scan_dataset(folder: Path, image_filter: ImageFilter = ImageFilter(),
                 exclude: tuple[Path, ...] = ()) -> DatasetScan:
    """Every usable image of `folder` with its caption; refused when none is left."""
    images = image_files(folder, exclude)
    if not images:
        raise SdkitError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    captions, source = read_captions(folder, images)
    scan = DatasetScan(folder, [], caption_source=source)
    for path in images:
        size = image_size(path)
        reason = size if isinstance(size, str) else image_filter.reason_to_drop(*size)
        if reason is not None:
            scan.dropped[path.relative_to(folder).as_posix()] = reason
            continue
        if path not in captions:
            scan.uncaptioned += 1
        scan.records.append(ImageRecord(path, captions.get(path, ""), *size))
    if not scan.records:
        first = next(iter(scan.dropped.items()))
        raise SdkitError(f"{folder}: all {len(images)} images were filtered out (e.g. {first[0]}: {first[1]})")
    return scan


def with_trigger(caption: str, trigger: str | None) -> str:
    """The trigger word first, kohya-style: `trigger, caption`."""
    if not trigger:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def tag_frequency(scan: DatasetScan) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: comma-separated tags counted per dataset folder."""
    counts: Counter[str] = Counter()
    for record in scan.records:
        counts.update(tag.strip() for tag in record.caption.split(",") if tag.strip())
    return {scan.folder.name: dict(sorted(counts.items()))}
