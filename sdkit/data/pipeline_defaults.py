"""What an SD 1.x / 2.x / SDXL pipeline needs beyond its weights, as the released models set it.

A single-file checkpoint holds the UNet, VAE and text encoders (their configs follow
from the weights, `sdkit.arch.keymaps.stock`) but no scheduler and no tokenizer. The
released diffusers repositories all carry the same two things, which sdkit ships:
- the LDM training schedule (betas 0.00085 -> 0.012, `scaled_linear`, 1000 steps,
  `steps_offset` 1), under the scheduler class each repository names (PNDM for
  stable-diffusion-v1-5, DDIM for stable-diffusion-2-1, Euler for SDXL base and
  refiner), with the model's prediction type (`v_prediction` for SD 2.x 768-v and
  v-prediction SDXL) and, for models trained for a zero terminal SNR (the `ztsnr`
  marker), `rescale_betas_zero_snr`;
- CLIP tokenizers (`sdkit.data.clip_tokenizer`): `tokenizer` pads with `<|endoftext|>`
  in SD 1.x and SDXL, SD 2.x's `tokenizer` and SDXL's `tokenizer_2` (OpenCLIP encoders)
  pad with `!` (ComfyUI `sd2_clip.py` / `sdxl_clip.py` pad those with id 0).
They fit a text encoder whose vocabulary is CLIP's 49408 tokens; a model with another
vocabulary needs its own tokenizer (`--config`).

Layouts are `sdkit.arch.keymaps.LAYOUTS` names (sd1, sd2, sdxl, sdxl_refiner).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdkit.data.clip_tokenizer import (
    END_OF_TEXT,
    OPENCLIP_PAD,
    VOCAB_SIZE,
    clip_tokenizer,
    write_clip_tokenizer,
)

TRAINING_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                     "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False,
                     "set_alpha_to_one": False}
_EULER = ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "interpolation_type": "linear"})
RELEASED_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sd1": ("PNDMScheduler", {"skip_prk_steps": True}),
    "sd2": ("DDIMScheduler", {}),
    "sdxl": _EULER,
    "sdxl_refiner": _EULER,
}
# tokenizer folder -> the token it pads with, per layout
TOKENIZER_PADS: dict[str, dict[str, str]] = {
    "sd1": {"tokenizer": END_OF_TEXT},
    "sd2": {"tokenizer": OPENCLIP_PAD},
    "sdxl": {"tokenizer": END_OF_TEXT, "tokenizer_2": OPENCLIP_PAD},
    "sdxl_refiner": {"tokenizer_2": OPENCLIP_PAD},
}
SHIPPED_TOKENIZER = "the CLIP tokenizer sdkit ships (OpenAI CLIP's BPE merges)"


def _prediction(prediction: str, zero_snr: bool) -> dict[str, Any]:
    settings: dict[str, Any] = {"prediction_type": "v_prediction" if prediction == "v" else "epsilon"}
    if zero_snr:
        settings["rescale_betas_zero_snr"] = True
    return settings


def released_scheduler_config(layout: str, prediction: str, zero_snr: bool = False) -> dict[str, Any]:
    """scheduler_config.json as the family's released repository writes it, for this model's
    prediction type and schedule."""
    name, settings = RELEASED_SCHEDULERS[layout]
    return {"_class_name": name, **TRAINING_SCHEDULE, **settings, **_prediction(prediction, zero_snr)}


def sampling_schedule(prediction: str, zero_snr: bool = False) -> dict[str, Any]:
    """The schedule a sampler starts from when the model brings none: the training schedule
    with "leading" timesteps (as SDXL's released Euler config spaces them)."""
    return {**TRAINING_SCHEDULE, "timestep_spacing": "leading", **_prediction(prediction, zero_snr)}


def tokenizer_fits(encoder_config: Mapping[str, Any]) -> bool:
    """Whether the shipped tokenizer's ids are this text encoder's: CLIP's vocabulary size."""
    return int(encoder_config.get("vocab_size", 0)) == VOCAB_SIZE


def shipped_tokenizer(layout: str, name: str, encoder_config: Mapping[str, Any]) -> Any | None:
    """The shipped CLIP tokenizer `name` of `layout`, or None where it does not fit."""
    pad = TOKENIZER_PADS.get(layout, {}).get(name)
    return clip_tokenizer(pad) if pad is not None and tokenizer_fits(encoder_config) else None


def write_shipped_tokenizer(folder: Path, layout: str, name: str) -> None:
    write_clip_tokenizer(folder, TOKENIZER_PADS[layout][name])


def tokenizer_refusal(encoder_config: Mapping[str, Any]) -> str:
    """Why the shipped tokenizer cannot stand in (a clause of the caller's one-line message)."""
    return (f"its text encoder has {encoder_config.get('vocab_size')} token rows, not the {VOCAB_SIZE} "
            "of the CLIP tokenizer sdkit ships")
