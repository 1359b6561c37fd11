"""Pieces the loop is assembled from: accelerator, samples, optimizer, schedule, freezing."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sdkit.errors import SdkitError, with_article
from sdkit.runtime.pipeline import LoadedModel
from sdkit.runtime.train.buckets import (
    Size,
    bucket_resolutions,
    bucket_step,
    nearest_bucket,
)
from sdkit.runtime.train.config import DataOptions, OptimOptions, TrainConfig
from sdkit.runtime.train.data import DatasetScan, ImageRecord, image_size, with_trigger
from sdkit.runtime.train.latents import TrainSample
from sdkit.runtime.train.precision import PrecisionPlan


def make_accelerator(plan: PrecisionPlan, grad_accum: int, cpu: bool) -> Any:
    """accelerate's Accelerator for this precision. accelerate keeps one global state per
    process; a single process that trained before at another precision gets it reset."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    settings = {"mixed_precision": plan.mixed_precision, "gradient_accumulation_steps": grad_accum, "cpu": cpu}
    try:
        return Accelerator(**settings)
    except ValueError as exc:
        if "already been initialized" not in str(exc) or PartialState().num_processes > 1:
            raise SdkitError(f"accelerate: {exc}") from None
        AcceleratorState._reset_state()
        return Accelerator(**settings)


def micro_seed(seed: int, micro: int, process: int) -> int:
    """The seed of one micro-step's randomness on one process (63 bits)."""
    digest = hashlib.sha256(f"{seed}:{micro}:{process}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def unet_levels(model: LoadedModel) -> int:
    return len(model.pipe.unet.config.block_out_channels)


def base_is_flow(path: Path, has_parts: bool = False) -> bool:
    """Whether the base is a flow-matching model (FLUX.1), from its header; a diffusion
    model alone is taken with its parts given as files (`has_parts`)."""
    from sdkit.arch import identify
    from sdkit.io import open_model
    if not path.exists():
        raise SdkitError(f"{path}: no such file or directory")
    with open_model(path) as model:
        identity = identify(model)
    flow = identity.family == "flux"  # the one transformer family the trainer runs
    if flow and identity.components == ["transformer"] and not has_parts:
        raise SdkitError(f"{path}: is {with_article(identity.part or 'diffusion model')} alone; FLUX.1 trains "
                         "from a diffusers folder, or from the diffusion model with its --text-encoder and --vae "
                         "files and --config DIR (configs and tokenizers)")
    return flow


def denoiser_of(model: LoadedModel) -> torch.nn.Module:
    """The UNet, or a flow model's transformer."""
    return model.pipe.transformer if model.is_flow else model.pipe.unet


def training_buckets(model: LoadedModel, data: DataOptions) -> tuple[int, list[Size]]:
    """(resolution, the buckets pictures may go to)."""
    resolution = data.resolution or model.default_size
    minimum = model.size_multiple if model.is_flow else bucket_step(model.vae_scale_factor, unet_levels(model))
    step = data.bucket_step or minimum
    if step % minimum:
        raise SdkitError(f"--bucket-step {step} must be a multiple of {minimum} (VAE factor x UNet downsampling)")
    if resolution % minimum:
        raise SdkitError(f"--resolution {resolution} must be a multiple of {minimum} "
                         "(VAE factor x UNet downsampling)")
    if not data.buckets:
        return resolution, [(resolution, resolution)]
    return resolution, bucket_resolutions(resolution, step)


def instance_samples(scan: DatasetScan, buckets: Sequence[Size], data: DataOptions) -> list[TrainSample]:
    """Every picture `repeats` times, in its bucket, with the trigger word in its caption."""
    samples = []
    for record in scan.records:
        bucket = nearest_bucket(record.width, record.height, buckets)
        caption = with_trigger(record.caption, data.trigger)
        samples += [TrainSample(record, bucket, caption)] * data.repeats
    return samples


def class_samples(paths: Sequence[Path], prompt: str, resolution: int) -> list[TrainSample]:
    samples = []
    for path in paths:
        size = image_size(path)
        if isinstance(size, str):
            raise SdkitError(f"{path}: class picture {size}")
        samples.append(TrainSample(ImageRecord(path, prompt, *size), (resolution, resolution), prompt, True))
    return samples


def bucket_counts(samples: Sequence[TrainSample]) -> dict[Size, int]:
    return dict(Counter(sample.bucket for sample in samples))


def freeze(model: LoadedModel) -> None:
    for module in (denoiser_of(model), model.pipe.vae, *(getattr(model.pipe, n) for n in model.text_components)):
        module.requires_grad_(False)


def cast_frozen(modules: Sequence[torch.nn.Module], dtype: torch.dtype) -> None:
    """Frozen float weights to `dtype`; trainable ones stay float32."""
    if dtype == torch.float32:
        return
    for module in modules:
        for parameter in module.parameters():
            if not parameter.requires_grad and parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype)


def make_optimizer(groups: list[dict[str, Any]], optim: OptimOptions, device: torch.device) -> torch.optim.Optimizer:
    from sdkit.runtime.train.optimizers import build_optimizer

    groups = [group for group in groups if group["params"]]
    if not groups:
        raise SdkitError("nothing to train: the method made no parameter trainable")
    return build_optimizer(groups, optim.optimizer, optim.lr, optim.weight_decay, device)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimOptions, done: int = 0) -> Any:
    """diffusers' `get_scheduler`, advanced to `done` steps (a resumed run's position)."""
    import warnings

    from diffusers.optimization import get_scheduler

    name = optim.lr_scheduler
    if name == "constant" and optim.warmup_steps:
        name = "constant_with_warmup"
    if optim.optimizer == "adafactor":  # kohya's adafactor:LR scheduler
        from sdkit.runtime.train.optimizers import adafactor_schedule

        scheduler = adafactor_schedule(optimizer, optim.lr)
    else:
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=optim.warmup_steps,
                                  num_training_steps=optim.steps)
    with warnings.catch_warnings():  # stepping the schedule alone is what replaying it means
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done):
            scheduler.step()
    return scheduler


def enable_checkpointing(model: LoadedModel, text_grad: bool) -> None:
    denoiser_of(model).enable_gradient_checkpointing()
    if text_grad:
        for name in model.text_components:
            getattr(model.pipe, name).gradient_checkpointing_enable()


def side_path(config: TrainConfig, suffix: str) -> Path:
    """A file beside the output named after it: `<stem><suffix>`."""
    return config.stem.with_name(config.stem.name + suffix)
