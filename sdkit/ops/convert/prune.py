"""Pruning: keep a checkpoint's model weights, drop what training left behind.

Dropped, each under its reason (formats.md (g), arenasys toolkit):
- "ema": the EMA copy of the UNet (`model_ema.diffusion_model<dotless path>`) and its
  `model_ema.decay` / `model_ema.num_updates` counters;
- "scheduler": the noise-schedule buffers LDM registers (`alphas_cumprod`, `betas`,
  `sqrt_*`, `posterior_*`, `log_one_minus_alphas_cumprod`, `logvar`, `lvlb_weights`),
  which every loader recomputes;
- "training": VAE discriminator / perceptual-loss weights (`loss.*`, `first_stage_model.loss.*`)
  and optimizer state;
- "not model weights" (LDM checkpoints of a known layout only): keys outside the layout's
  component prefixes. Markers loaders read are kept: `v_pred`, `ztsnr`, `edm_mean`,
  `edm_std`, `edm_vpred.sigma_{max,min}` (ComfyUI `supported_models.py`), and the extra
  parts of depth / unCLIP models (`depth_model.`, `embedder.`, `noise_augmentor.`).

`swap_in_ema` makes the EMA copy the model: `model_ema.diffusion_model<path without dots>`
becomes `model.diffusion_model.<path>`, matched by taking the dots out of the real keys
(LDM's LitEma names its buffers that way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from sdkit.errors import SdkitError
from sdkit.io import LazyTensor

EMA_PREFIX = "model_ema."
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
UNET_PREFIX = "model.diffusion_model."
SCHEDULER_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
})
MARKERS = frozenset({"v_pred", "ztsnr", "edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min"})
EXTRA_PARTS = ("depth_model.", "embedder.", "noise_augmentor.")
_TRAINING_PREFIXES = ("loss.", "first_stage_model.loss.", "optimizer.", "optimizer_states.",
                      "lr_schedulers.")

REASON_EMA, REASON_SCHEDULER, REASON_TRAINING, REASON_OTHER = (
    "ema", "scheduler", "training", "not model weights")
REASON_REPLACED = "replaced by EMA"


@dataclass
class PruneReport:
    """Keys left out of the output, by reason, and the bytes each reason saved."""

    dropped: dict[str, list[str]] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    ema_swapped: int = 0

    def drop(self, reason: str, key: str, nbytes: int) -> None:
        self.dropped.setdefault(reason, []).append(key)
        self.bytes[reason] = self.bytes.get(reason, 0) + nbytes

    @property
    def bytes_saved(self) -> int:
        return sum(self.bytes.values())

    def to_json(self) -> dict[str, object]:
        return {"dropped": {reason: len(keys) for reason, keys in self.dropped.items()},
                "bytes": dict(self.bytes), "bytes_saved": self.bytes_saved,
                "ema_swapped": self.ema_swapped}


def prune_reason(key: str, model_prefixes: Sequence[str] | None) -> str | None:
    """Why `key` is not a model weight, or None to keep it.

    `model_prefixes` are the component prefixes of the file's layout; None when the layout
    is not known, which keeps every key the other rules do not name.
    """
    if key.startswith(EMA_PREFIX):
        return REASON_EMA
    if key in SCHEDULER_BUFFERS:
        return REASON_SCHEDULER
    if key.startswith(_TRAINING_PREFIXES):
        return REASON_TRAINING
    if model_prefixes is None or key in MARKERS or key.startswith(EXTRA_PARTS):
        return None
    return None if key.startswith(tuple(model_prefixes)) else REASON_OTHER


def prune_tensors(tensors: Mapping[str, LazyTensor], model_prefixes: Sequence[str] | None,
                  report: PruneReport) -> dict[str, LazyTensor]:
    """The tensors that are model weights; the others are recorded in `report`."""
    kept: dict[str, LazyTensor] = {}
    for key, lazy in tensors.items():
        reason = prune_reason(key, model_prefixes)
        if reason is None:
            kept[key] = lazy
        else:
            report.drop(reason, key, lazy.nbytes)
    return kept


def _dotless_index(keys: Sequence[str]) -> dict[str, str]:
    """`diffusion_model<path without dots>` -> the UNet key it stands for."""
    index: dict[str, str] = {}
    for key in keys:
        dotless = "diffusion_model" + key[len(UNET_PREFIX):].replace(".", "")
        if dotless in index:
            raise SdkitError(f"{key} and {index[dotless]} have the same EMA name; "
                             "cannot tell which EMA tensor belongs to which")
        index[dotless] = key
    return index


def swap_in_ema(tensors: Mapping[str, LazyTensor], report: PruneReport,
                where: str = "input") -> dict[str, LazyTensor]:
    """The UNet weights replaced by their EMA copies; every `model_ema.*` key left out."""
    unet = [key for key in tensors if key.startswith(UNET_PREFIX)]
    ema = {key[len(EMA_PREFIX):]: key for key in tensors
           if key.startswith(EMA_PREFIX) and key not in EMA_COUNTERS}
    if not unet or not ema:
        raise SdkitError(f"{where}: --ema needs model_ema.* weights beside a model.diffusion_model.* "
                         "UNet; this file has " + ("no EMA weights" if unet else "no LDM UNet"))
    index = _dotless_index(unet)
    stray = sorted(name for name in ema if name not in index)
    missing = sorted(key for dotless, key in index.items() if dotless not in ema)
    if stray or missing:
        example = (EMA_PREFIX + stray[0]) if stray else missing[0]
        raise SdkitError(f"{where}: the EMA weights do not match the UNet ({len(stray)} EMA tensors "
                         f"without a UNet key, {len(missing)} UNet keys without EMA, e.g. {example})")
    out = dict(tensors)
    for dotless, key in index.items():
        source = tensors[ema[dotless]]
        if source.shape != tensors[key].shape:
            raise SdkitError(f"{where}: EMA copy of {key} has shape {list(source.shape)}, "
                             f"the model {list(tensors[key].shape)}")
        report.drop(REASON_REPLACED, key, tensors[key].nbytes)
        out[key] = source
    moved = set(ema.values())
    for key in [k for k in out if k.startswith(EMA_PREFIX)]:
        if key not in moved:  # the decay / step counters
            report.drop(REASON_EMA, key, tensors[key].nbytes)
        del out[key]
    report.ema_swapped = len(index)
    return out
