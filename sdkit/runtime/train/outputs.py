"""What a run leaves beside its output: kohya `ss_*` metadata, `train.json`, a loss curve.

`ss_*` keys follow sd-scripts' `train_network.py` (research: formats.md (f)): every value
a string (`str()` of a number, a bool or None, as kohya writes them), structured ones
JSON, hashes of the base as kohya computes them (`ss_sd_model_hash` = A1111's legacy hash,
`ss_new_sd_model_hash` = sha256). Augmentations sdkit does not have (flips, colour, caption
shuffling, kept tokens, CLIP skip) are written as kohya writes them when they are off.
`ss_datasets` describes the one dataset as kohya's dataset-config runs do: a folder with
caption files is a DreamBooth-style dataset (class pictures a regularisation subset), one
with `metadata.jsonl` / `metadata.csv` a fine-tuning dataset.
`<output stem>.train.json` records the run: options, base, data (with what the filters
dropped), steps, a loss summary and every step's loss, timings and the files written.
`<output stem>.loss.png` plots the loss (each step and a moving average), drawn with
Pillow so no plotting library is needed.
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Sequence

from sdkit import __version__
from sdkit.arch.families import FAMILIES, kohya_base_model_version
from sdkit.io.output_path import write_file_atomically
from sdkit.runtime.train.buckets import Size
from sdkit.runtime.train.config import TrainConfig
from sdkit.runtime.train.data import DatasetScan, tag_frequency
from sdkit.runtime.train.optimizers import OPTIMIZER_CLASSES



@dataclass
class RunFacts:
    """What the loop measured and decided, for metadata and the record."""

    family: str
    prediction: str  # "epsilon" | "v"
    precision: str  # "fp32" | "fp16" | "bf16"
    resolution: int
    buckets: dict[Size, int]  # bucket -> instance samples in it
    samples: int  # instance samples per epoch (repeats included)
    class_images: int
    batches_per_epoch: int
    processes: int
    steps_done: int
    started_at: float
    finished_at: float
    base_hashes: dict[str, str | None] = field(default_factory=dict)  # sha256, legacy
    class_dir: Path | None = None  # where the DreamBooth class pictures are
    # kohya's random integer telling which training session a file came from
    session_id: int = field(default_factory=lambda: secrets.randbelow(2 ** 32 + 1))
    # kohya subsets: folder name -> {"n_repeats", "img_count", "is_reg"}
    subsets: dict[str, dict[str, Any]] = field(default_factory=dict)


def kohya_metadata(config: TrainConfig, scan: DatasetScan, facts: RunFacts) -> dict[str, str]:
    """sd-scripts' `ss_*` training keys for this run (all strings)."""
    optim, data = config.optim, config.data
    epochs = math.ceil(facts.steps_done * optim.grad_accum * facts.processes / max(facts.batches_per_epoch, 1))
    sides = [side for bucket in facts.buckets for side in bucket]
    metadata = {
        "ss_session_id": str(facts.session_id), "ss_output_name": config.stem.name,
        "ss_sd_model_name": config.base.name,
        "ss_learning_rate": str(optim.lr), "ss_unet_lr": str(optim.lr),
        "ss_text_encoder_lr": str(optim.text_encoder_lr or optim.lr),
        "ss_steps": str(facts.steps_done), "ss_max_train_steps": str(optim.steps), "ss_epoch": str(epochs),
        "ss_num_epochs": str(epochs), "ss_num_batches_per_epoch": str(facts.batches_per_epoch),
        "ss_batch_size_per_device": str(optim.batch_size), "ss_gradient_accumulation_steps": str(optim.grad_accum),
        "ss_total_batch_size": str(optim.batch_size * optim.grad_accum * facts.processes),
        "ss_lr_scheduler": optim.lr_scheduler, "ss_lr_warmup_steps": str(optim.warmup_steps),
        "ss_optimizer": f"{OPTIMIZER_CLASSES[optim.optimizer]}(weight_decay={optim.weight_decay})",
        "ss_max_grad_norm": str(optim.max_grad_norm), "ss_gradient_checkpointing": str(optim.gradient_checkpointing),
        "ss_mixed_precision": "no" if facts.precision == "fp32" else facts.precision,
        "ss_seed": str(config.run.seed), "ss_resolution": str((facts.resolution, facts.resolution)),
        "ss_enable_bucket": str(data.buckets), "ss_min_bucket_reso": str(min(sides)),
        "ss_max_bucket_reso": str(max(sides)), "ss_bucket_no_upscale": "False",
        "ss_bucket_info": json.dumps(_bucket_info(facts)),
        "ss_num_train_images": str(facts.samples), "ss_num_reg_images": str(facts.class_images),
        "ss_dataset_dirs": json.dumps({scan.folder.name: {"n_repeats": data.repeats, "img_count": len(scan.records)}}),
        "ss_reg_dataset_dirs": json.dumps(_reg_dirs(facts)),
        "ss_datasets": json.dumps([_dataset(config, scan, facts, min(sides), max(sides))]),
        "ss_tag_frequency": json.dumps(tag_frequency(scan)),
        "ss_random_crop": str(data.crop == "random"), "ss_flip_aug": str(data.flip_aug), "ss_color_aug": "False",
        "ss_shuffle_caption": str(data.shuffle_caption), "ss_keep_tokens": str(data.keep_tokens),
        "ss_clip_skip": "None",
        "ss_caption_dropout_rate": str(data.caption_dropout), "ss_cache_latents": str(data.cache != "off"),
        "ss_noise_offset": str(config.loss.noise_offset), "ss_min_snr_gamma": str(config.loss.min_snr_gamma),
        "ss_training_started_at": str(facts.started_at), "ss_training_finished_at": str(facts.finished_at),
        "ss_v2": str(facts.family == "sd2"),
        "ss_training_comment": f"sdkit {__version__} train {config.method}",
    }
    if facts.prediction == "flow":
        from sdkit.runtime.train.flow import flow_metadata

        metadata.update(flow_metadata(config.loss.timestep_sampling or "uniform", config.loss.shift))
    if config.method == "dreambooth":
        metadata["ss_prior_loss_weight"] = str(config.dreambooth.prior_weight)
    if facts.family in FAMILIES:
        version = kohya_base_model_version(facts.family, prediction=facts.prediction)
        if version:
            metadata["ss_base_model_version"] = version
    hashes = facts.base_hashes
    if hashes.get("legacy"):
        metadata["ss_sd_model_hash"] = str(hashes["legacy"])
    if hashes.get("sha256"):
        metadata["ss_new_sd_model_hash"] = str(hashes["sha256"])
    metadata.update(_subset_metadata(config, facts))
    return metadata


def _subset_metadata(config: TrainConfig, facts: RunFacts) -> dict[str, str]:
    """kohya's per-folder counts of a run on kohya subsets, and the reg pictures' weight."""
    if not facts.subsets:
        return {}
    metadata = {key: json.dumps({name: {"n_repeats": s["n_repeats"], "img_count": s["img_count"]}
                                 for name, s in facts.subsets.items() if s["is_reg"] == reg})
                for key, reg in (("ss_dataset_dirs", False), ("ss_reg_dataset_dirs", True))}
    if any(s["is_reg"] for s in facts.subsets.values()):
        metadata["ss_prior_loss_weight"] = str(config.dreambooth.prior_weight)
    return metadata


def spec_metadata(config: TrainConfig, facts: RunFacts) -> dict[str, str]:
    """ModelSpec keys the run knows better than the family: the trained resolution, the trigger."""
    spec = {"modelspec.resolution": f"{facts.resolution}x{facts.resolution}"}
    if config.data.trigger:
        spec["modelspec.trigger_phrase"] = config.data.trigger
    run = config.run  # kohya's --metadata_title / _author / _description
    for key, value in (("title", run.metadata_title), ("author", run.metadata_author),
                       ("description", run.metadata_description)):
        if value:
            spec[f"modelspec.{key}"] = value
    return spec


def _bucket_info(facts: RunFacts) -> dict[str, Any]:
    return {"buckets": {str(i): {"resolution": list(bucket), "count": count}
                        for i, (bucket, count) in enumerate(sorted(facts.buckets.items()))}}


def _reg_dirs(facts: RunFacts) -> dict[str, dict[str, int]]:
    if not facts.class_images or facts.class_dir is None:
        return {}
    return {facts.class_dir.name: {"n_repeats": 1, "img_count": facts.class_images}}


def _subset(images: int, repeats: int, random_crop: bool) -> dict[str, Any]:
    return {"img_count": images, "num_repeats": repeats, "color_aug": False, "flip_aug": False,
            "random_crop": random_crop, "shuffle_caption": False, "keep_tokens": 0}


def _dataset(config: TrainConfig, scan: DatasetScan, facts: RunFacts, low: int, high: int) -> dict[str, Any]:
    """kohya's `ss_datasets` entry for the run's one dataset."""
    data = config.data
    dreambooth_style = not scan.caption_source.startswith("metadata")
    subset = _subset(len(scan.records), data.repeats, data.crop == "random")
    if dreambooth_style:
        subset.update(image_dir=scan.folder.name, class_tokens=data.trigger, is_reg=False)
    else:
        subset["metadata_file"] = scan.caption_source
    subsets = [subset]
    if facts.class_images and facts.class_dir is not None:
        subsets.append({**_subset(facts.class_images, 1, False), "image_dir": facts.class_dir.name,
                        "class_tokens": config.dreambooth.class_prompt, "is_reg": True})
    return {"is_dreambooth": dreambooth_style, "batch_size_per_device": config.optim.batch_size,
            "num_train_images": facts.samples, "num_reg_images": facts.class_images,
            "resolution": [facts.resolution, facts.resolution], "enable_bucket": data.buckets,
            "min_bucket_reso": low, "max_bucket_reso": high, "tag_frequency": tag_frequency(scan),
            "bucket_info": _bucket_info(facts), "subsets": subsets}


def loss_summary(losses: Sequence[float]) -> dict[str, Any]:
    if not losses:
        return {"steps": 0}
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": len(losses), "first": losses[0], "last": losses[-1], "min": min(losses),
            "mean": sum(losses) / len(losses), "mean_last_tenth": sum(tail) / len(tail), "per_step": list(losses)}


def write_json_atomic(path: Path, value: Any) -> Path:
    text = json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"
    return write_file_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"), overwrite=True)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    averaged, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averaged.append(total / min(index + 1, window))
    return averaged


def draw_loss_curve(path: Path, losses: Sequence[float], title: str, size: tuple[int, int] = (640, 360)) -> Path:
    """A PNG of the per-step loss (light) and its moving average (dark)."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 56, 16, 28, 32
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black")
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    if losses:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0
        count = max(len(losses) - 1, 1)

        def point(index: int, value: float) -> tuple[float, float]:
            x = left + (width - left - right) * index / count
            y = height - bottom - (height - top - bottom) * (value - low) / span
            return x, y

        window = max(1, len(losses) // 20)
        for series, colour in ((losses, (150, 180, 230)), (moving_average(losses, window), (20, 60, 160))):
            points = [point(i, v) for i, v in enumerate(series)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
        draw.text((4, top), f"{high:.4g}", fill="black")
        draw.text((4, height - bottom - 10), f"{low:.4g}", fill="black")
        draw.text((left, height - bottom + 8), "step 1", fill="black")
        draw.text((width - right - 60, height - bottom + 8), f"step {len(losses)}", fill="black")
    return write_file_atomically(path, lambda partial: image.save(partial, format="PNG"), overwrite=True)
