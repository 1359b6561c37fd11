"""kohya sd-scripts' dataset layouts: `N_concept` folders, dataset TOML files, captions
shuffled as tags, regularization images.

- A data folder whose subfolders are named `N_words` (e.g. `10_sks dog`) is read as
  kohya's DreamBooth layout (config_util.py `generate_dreambooth_subsets_config_by_subdirs`):
  each such subfolder is a subset repeated N times, and `words` is its class tokens, the
  caption of every picture without a caption file. Subfolders without the `N_` prefix are
  skipped, as kohya skips them (and so are pictures at the top level).
- `--reg-data` is a folder of the same layout holding regularization pictures, and
  `is_reg = true` marks a TOML subset as one. As in kohya's `DreamBoothDataset`, reg
  pictures are repeated until they are as many as the training samples (their own
  repeats first, then one more repeat each in turn), and their loss is weighted by the
  prior-loss weight (train_util.py `loss_weights`).
- `--dataset-config FILE` reads kohya's `[general]` / `[[datasets]]` /
  `[[datasets.subsets]]` keys that sdkit trains with; subset keys set in `[general]` or a
  dataset are the defaults of the subsets below them. Any other key is refused, naming it.
- Captions: with shuffling the caption is split at commas into tags; the first
  `keep_tokens` tags stay in place and the rest are shuffled (train_util.py
  `process_caption`), from each micro-step's own seeded generator.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from sdkit.errors import SdkitError

_FOLDER_NAME = re.compile(r"^(\d+)_(.*)$")
# [[datasets]] keys (and [general] defaults of them)
DATASET_KEYS = ("resolution", "batch_size", "enable_bucket")
# [[datasets.subsets]] keys (and [general] / [[datasets]] defaults of them)
SUBSET_KEYS = ("image_dir", "num_repeats", "caption_extension", "class_tokens", "keep_tokens", "shuffle_caption",
               "flip_aug", "is_reg")


@dataclass(frozen=True)
class Subset:
    """One folder of pictures and how kohya trains it."""

    image_dir: Path
    num_repeats: int = 1
    caption_extension: str | None = None  # None: sdkit's sidecars (.txt, then .caption)
    class_tokens: str | None = None  # the caption of pictures without a caption file
    keep_tokens: int = 0
    shuffle_caption: bool = False
    flip_aug: bool = False
    is_reg: bool = False


@dataclass(frozen=True)
class DatasetSettings:
    """What a dataset TOML sets beside its subsets (None: not set)."""

    resolution: int | None = None
    batch_size: int | None = None
    enable_bucket: bool | None = None


def is_concept_folder(folder: Path) -> bool:
    """Whether `folder` holds kohya `N_concept` subfolders."""
    return folder.is_dir() and any(path.is_dir() and _FOLDER_NAME.match(path.name) for path in folder.iterdir())


def folder_subsets(folder: Path, is_reg: bool, defaults: Subset | None = None) -> list[Subset]:
    """The `N_concept` subfolders of `folder` as subsets, sorted by name."""
    found = []
    for path in sorted(folder.iterdir()):
        match = _FOLDER_NAME.match(path.name)
        if not path.is_dir() or not match or int(match.group(1)) < 1:
            continue
        base = defaults or Subset(path)
        found.append(replace(base, image_dir=path, num_repeats=int(match.group(1)), class_tokens=match.group(2),
                             is_reg=is_reg))
    if not found:
        raise SdkitError(f"{folder}: no kohya N_concept subfolders (e.g. 10_sks dog) with a repeat count of 1 or more")
    return found


def split_tags(caption: str, keep_tokens: int, shuffle: bool, rng: random.Random) -> str:
    """kohya's tag shuffling: comma-separated tags, the first `keep_tokens` kept in place."""
    if not shuffle:
        return caption
    tags = [tag.strip() for tag in caption.strip().split(",")]
    fixed, flexible = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(flexible)
    return ", ".join(fixed + flexible)


def balanced_reg_repeats(train_samples: int, reg: list[int]) -> list[int]:
    """Repeats of each reg picture (given its subset's repeats) so that the reg samples
    match the training samples in number, as kohya's DreamBoothDataset counts them: each
    picture with its own repeats until enough, then one more each in turn."""
    repeats, total, first = [0] * len(reg), 0, True
    while reg and total < train_samples:
        for index, own in enumerate(reg):
            step = own if first else 1
            repeats[index] += step
            total += step
            if total >= train_samples:
                break
        first = False
    return repeats


# ---- dataset TOML -----------------------------------------------------------------------


def _typed(where: str, key: str, value: Any) -> Any:
    expected: dict[str, type | tuple[type, ...]] = {
        "image_dir": str, "num_repeats": int, "caption_extension": str, "class_tokens": str, "keep_tokens": int,
        "shuffle_caption": bool, "flip_aug": bool, "is_reg": bool, "batch_size": int, "enable_bucket": bool,
        "resolution": (int, list)}
    wanted = expected[key]
    if isinstance(value, bool) and wanted is int or not isinstance(value, wanted):
        raise SdkitError(f"{where}: {key} = {value!r} has the wrong type")
    if key == "resolution" and isinstance(value, list):
        if len(value) != 2 or value[0] != value[1] or not all(isinstance(v, int) for v in value):
            raise SdkitError(f"{where}: resolution {value!r}: sdkit trains square resolutions (one side or [n, n])")
        return value[0]
    return value


def _known(table: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise SdkitError(f"{where} must be a table")
    unknown = [key for key in table if key not in allowed]
    if unknown:
        raise SdkitError(f"{where}: unknown or unsupported keys {', '.join(unknown)} (sdkit reads "
                         f"{', '.join(allowed)})")
    return table


def _section(table: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    return {key: _typed(where, key, value) for key, value in _known(table, where, allowed).items()}


def _merged(settings: list[DatasetSettings], path: Path) -> DatasetSettings:
    """One run has one resolution and batch size: the datasets must agree."""
    merged = {}
    for field_ in fields(DatasetSettings):
        values = {getattr(s, field_.name) for s in settings} - {None}
        if len(values) > 1:
            raise SdkitError(f"{path}: the datasets set different {field_.name} values {sorted(values)}; "
                             "sdkit trains one set of pictures at one setting")
        merged[field_.name] = values.pop() if values else None
    return DatasetSettings(**merged)


def read_dataset_config(path: Path) -> tuple[DatasetSettings, list[Subset]]:
    """The settings and subsets of a kohya dataset TOML; relative image_dirs are taken from
    the file's folder."""
    import tomllib

    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SdkitError(f"{path}: cannot read the dataset config ({exc.__class__.__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SdkitError(f"{path}: not TOML ({exc})") from None
    _known(document, str(path), ("general", "datasets"))
    inherited = tuple(k for k in DATASET_KEYS + SUBSET_KEYS if k != "image_dir")
    general = _section(document.get("general", {}), f"{path} [general]", inherited)
    datasets = document.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise SdkitError(f"{path}: no [[datasets]] with [[datasets.subsets]]")
    settings, subsets = [], []
    for number, dataset in enumerate(datasets):
        where = f"{path} datasets[{number}]"
        if not isinstance(dataset, dict):
            raise SdkitError(f"{where} must be a table")
        own = _section({k: v for k, v in dataset.items() if k != "subsets"}, where, inherited)
        values = {**general, **own}
        settings.append(DatasetSettings(**{k: values[k] for k in DATASET_KEYS if k in values}))
        subset_tables = dataset.get("subsets")
        if not isinstance(subset_tables, list) or not subset_tables:
            raise SdkitError(f"{where}: no [[datasets.subsets]]")
        for index, table in enumerate(subset_tables):
            subsets.append(_subset(path, f"{where}.subsets[{index}]", {**values, **_section(
                table, f"{where}.subsets[{index}]", SUBSET_KEYS)}))
    return _merged(settings, path), subsets


def _subset(path: Path, where: str, values: Mapping[str, Any]) -> Subset:
    if "image_dir" not in values:
        raise SdkitError(f"{where}: image_dir is required")
    folder = Path(values["image_dir"])
    folder = folder if folder.is_absolute() else path.parent / folder
    if not folder.is_dir():
        raise SdkitError(f"{where}: image_dir {folder} is not a folder")
    chosen = {k: values[k] for k in SUBSET_KEYS if k in values and k != "image_dir"}
    if chosen.get("num_repeats", 1) < 1 or chosen.get("keep_tokens", 0) < 0:
        raise SdkitError(f"{where}: num_repeats must be at least 1 and keep_tokens at least 0")
    return Subset(folder, **chosen)


# ---- assembled for a run ----------------------------------------------------------------


@dataclass
class SubsetScan:
    subset: Subset
    scan: Any  # sdkit.runtime.train.data.DatasetScan


def with_dataset_settings(config: Any) -> Any:
    """`config` with its dataset TOML's resolution, batch size and bucketing; an option set
    to another value on the command line too is refused."""
    if config.data.dataset_config is None:
        return config
    settings, _ = read_dataset_config(config.data.dataset_config)
    data, optim = config.data, config.optim
    chosen = (("resolution", "--resolution", data.resolution, None),
              ("batch_size", "--batch-size", optim.batch_size, 1),
              ("enable_bucket", "--no-buckets", data.buckets, True))
    for key, option, value, default in chosen:
        wanted = getattr(settings, key)
        if wanted is not None and value != default and value != wanted:
            raise SdkitError(f"{option} and the dataset config's {key} = {wanted!r} disagree; drop one")
    data = replace(data, resolution=settings.resolution or data.resolution,
                   buckets=data.buckets if settings.enable_bucket is None else settings.enable_bucket)
    optim = replace(optim, batch_size=settings.batch_size or optim.batch_size)
    return replace(config, data=data, optim=optim)


def subsets_of(config: Any) -> tuple[DatasetSettings, list[Subset]] | None:
    """The kohya subsets a run's options name, with the TOML's settings; None when the data
    folder is a plain one (sdkit's own layout)."""
    data = config.data
    defaults = Subset(data.folder, keep_tokens=data.keep_tokens, shuffle_caption=data.shuffle_caption,
                      flip_aug=data.flip_aug)
    if data.dataset_config is not None:
        settings, subsets = read_dataset_config(data.dataset_config)
    elif is_concept_folder(data.folder):
        settings, subsets = DatasetSettings(), folder_subsets(data.folder, False, defaults)
    elif data.reg_folder is not None:
        settings, subsets = DatasetSettings(), [replace(defaults, num_repeats=data.repeats)]
    else:
        return None
    if data.reg_folder is not None:
        subsets += folder_subsets(data.reg_folder, True, defaults)
    return settings, subsets


def scan_subsets(subsets: list[Subset], image_filter: Any, exclude: tuple[Path, ...]) -> list[SubsetScan]:
    """Each subset's pictures (its folder's own, as kohya globs them) and captions: the
    caption file of the subset's extension, else the class tokens."""
    from sdkit.runtime.train import data

    scans = []
    for subset in subsets:
        images = [p for p in data.image_files(subset.image_dir, exclude) if p.parent == subset.image_dir]
        if not images:
            raise SdkitError(f"{subset.image_dir}: no images in this subset's folder")
        if subset.caption_extension is None:
            captions, source = data.read_captions(subset.image_dir, images)
        else:
            sidecars = {image: image.with_suffix(subset.caption_extension) for image in images}
            captions = {image: path.read_text(encoding="utf-8").strip() for image, path in sidecars.items()
                        if path.is_file()}
            source = "sidecar" if captions else "none"
        scan = data.DatasetScan(subset.image_dir, [], caption_source=source)
        for path in images:
            size = data.image_size(path)
            reason = size if isinstance(size, str) else image_filter.reason_to_drop(*size)
            if reason is not None:
                scan.dropped[path.name] = reason
                continue
            if path not in captions and not subset.class_tokens:
                scan.uncaptioned += 1
            scan.records.append(data.ImageRecord(path, captions.get(path) or subset.class_tokens or "", *size))
        scans.append(SubsetScan(subset, scan))
    if not any(s.scan.records for s in scans if not s.subset.is_reg):
        raise SdkitError("no training pictures left in the subsets (all are regularization pictures or filtered out)")
    return scans


def combined_scan(scans: list[SubsetScan]) -> Any:
    """One DatasetScan over every subset (reports, fingerprints), rooted at their common folder."""
    import os

    from sdkit.runtime.train.data import DatasetScan

    root = Path(os.path.commonpath([s.subset.image_dir.resolve() for s in scans]))
    combined = DatasetScan(root, [], caption_source="kohya subsets")
    for item in scans:
        folder = item.subset.image_dir.resolve()
        combined.records += [replace(r, path=folder / r.path.name) for r in item.scan.records]
        combined.dropped.update({f"{folder.relative_to(root).as_posix()}/{k}": v for k, v in item.scan.dropped.items()})
        combined.uncaptioned += item.scan.uncaptioned
    return combined


def subset_samples(scans: list[SubsetScan], buckets: Any, trigger: str | None, prior_weight: float) -> list[Any]:
    """Training samples of every subset with its repeats; reg pictures balanced against the
    training samples and weighted by `prior_weight`."""
    from sdkit.runtime.train.buckets import nearest_bucket
    from sdkit.runtime.train.data import with_trigger
    from sdkit.runtime.train.latents import TrainSample

    def samples_of(item: SubsetScan, repeats: int) -> list[TrainSample]:
        subset, found = item.subset, []
        for record in item.scan.records:
            sample = TrainSample(record, nearest_bucket(record.width, record.height, buckets),
                                 with_trigger(record.caption, trigger), weight=prior_weight if subset.is_reg else 1.0,
                                 keep_tokens=subset.keep_tokens, shuffle_caption=subset.shuffle_caption,
                                 flip_aug=subset.flip_aug)
            found += [sample] * repeats
        return found

    train = [s for item in scans if not item.subset.is_reg for s in samples_of(item, item.subset.num_repeats)]
    reg_items = [(item, record) for item in scans if item.subset.is_reg for record in item.scan.records]
    repeats = balanced_reg_repeats(len(train), [item.subset.num_repeats for item, _ in reg_items])
    reg = [s for (item, record), count in zip(reg_items, repeats, strict=True)
           for s in samples_of(SubsetScan(item.subset, replace(item.scan, records=[record])), count)]
    return train + reg
