"""Image-to-image and A1111's hires fix, on the components of the loaded pipeline.

Denoising strength follows A1111 (`modules/sd_samplers_common.py::setup_img2img_steps`,
`sample_img2img` of `sd_samplers_kdiffusion.py` and `sd_samplers_timesteps.py`):
- img2img with strength s and N steps runs the last steps of an N-step schedule:
  int(N * s) + 1 of them (at most N) with the k-diffusion samplers, int(N * s) with the
  timestep ones (DDIM, PLMS, UniPC); strength 1 starts from pure noise at the picture's
  size (the init image no longer matters, as diffusers' inpaint pipelines treat full
  strength; A1111 still adds it under the largest sigma);
- the hires pass runs exactly `Hires steps` steps (`Steps` when 0), the last ones of a
  schedule of int(H / min(s, 0.999)) steps.
The hires pass enlarges the first picture by `Hires upscale` (A1111's size: int(side *
scale), down to the VAE's factor), either its latents (A1111's "Latent" upscalers:
torch interpolation) or the decoded picture (PIL's Lanczos / nearest), then draws it again
with the same seeds.

The transformer families with a diffusers img2img pipeline (`SamplingPipeline.img2img_class`)
take the steps as that pipeline does: `steps` is the schedule's length and the strength is
the denoise itself (it runs steps - int(steps - steps * s) of them), for img2img and the
hires pass alike. Those pipelines start from a picture (FLUX.1's latents are packed into
tokens besides), so their hires pass enlarges the decoded picture: the "Latent" upscalers
interpolate its pixels the same way.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdkit.errors import SdkitError

# A1111's upscaler names (modules/shared.py latent_upscale_modes; the PIL ones of
# modules/upscaler.py): (latent interpolation mode, antialias) or a PIL filter name
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS = {"Lanczos": "LANCZOS", "Nearest": "NEAREST"}


@dataclass(frozen=True)
class Hires:
    """A1111's hires fix: its PNG fields are "Hires upscale", "Hires steps", "Hires
    upscaler" and, for the second pass, "Denoising strength"."""

    scale: float
    steps: int = 0  # 0: as many as the first pass
    denoise: float = 0.7  # A1111's default
    upscaler: str = "Latent"


def upscaler_name(name: str) -> str:
    """A1111's spelling of an upscaler name given in any case (`latent`, `lanczos`)."""
    for known in (*LATENT_UPSCALERS, *IMAGE_UPSCALERS):
        if known.lower() == " ".join(name.strip().lower().split()):
            return known
    raise SdkitError(f"unknown hires upscaler {name!r} (choose from "
                     f"{', '.join([*LATENT_UPSCALERS, *IMAGE_UPSCALERS])})")


def check_hires(hires: Hires) -> None:
    if hires.scale <= 0:
        raise SdkitError(f"--hires-scale must be above 0, not {hires.scale:g}")
    if hires.steps < 0:
        raise SdkitError(f"--hires-steps must be 0 (the first pass's) or more, not {hires.steps}")
    check_denoise(hires.denoise, "--hires-denoise")
    upscaler_name(hires.upscaler)


def check_denoise(denoise: float, option: str) -> None:
    if not 0 < denoise <= 1:
        raise SdkitError(f"{option} must be above 0 and at most 1, not {denoise:g}")


def img2img_steps(steps: int, denoise: float, timestep_sampler: bool = False) -> int:
    """The steps A1111's img2img of `steps` at strength `denoise` runs: its k-diffusion
    samplers start one sigma before int(steps * denoise) from the end, its timestep
    samplers (DDIM, PLMS, UniPC) at that timestep."""
    if denoise >= 1:
        return steps
    encoded = int(min(denoise, 0.999) * steps)
    return encoded if timestep_sampler else min(encoded + 1, steps)


def diffusers_strength(steps: int, length: int) -> float:
    """The strength at which diffusers' img2img runs the last `steps` steps of a `length`
    schedule (it runs int(length * strength); the half step keeps the product from
    rounding down)."""
    return min(1.0, (steps + 0.5) / length)


def hires_schedule(steps: int, denoise: float) -> tuple[int, float]:
    """(schedule length, diffusers strength) that run exactly `steps` steps at A1111's
    hires `denoise`."""
    length = max(int(steps / min(denoise, 0.999)), steps)
    return length, diffusers_strength(steps, length)


def hires_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    return tuple(max(multiple, int(side * scale) // multiple * multiple) for side in (width, height))  # type: ignore[return-value]


def load_init_image(path: str | Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise SdkitError(f"{path}: no such file (--init-image)") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise SdkitError(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def resized(image: Any, size: tuple[int, int], upscaler: str = "Lanczos") -> Any:
    from PIL import Image

    if image.size == size:
        return image
    return image.resize(size, getattr(Image.Resampling, IMAGE_UPSCALERS[upscaler]))


def upscale_pixels(image: Any, size: tuple[int, int], upscaler: str) -> Any:
    """The picture enlarged by any upscaler: PIL's filter, or a "Latent" one's torch
    interpolation on its pixels."""
    import numpy as np
    import torch
    from PIL import Image

    if upscaler in IMAGE_UPSCALERS:
        return resized(image, size, upscaler)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    enlarged = upscale_latents(pixels, size, 1, upscaler).clamp(0, 255).round()
    return Image.fromarray(enlarged[0].permute(1, 2, 0).to(torch.uint8).numpy())


def upscale_latents(latents: Any, size: tuple[int, int], factor: int, upscaler: str) -> Any:
    import torch

    mode, antialias = LATENT_UPSCALERS[upscaler]
    target = (size[1] // factor, size[0] // factor)
    return torch.nn.functional.interpolate(latents, size=target, mode=mode, antialias=antialias)


def flow_image_to_image_pipeline(pipe: Any, class_name: str) -> Any:
    """A transformer family's img2img pipeline over the loaded pipeline's modules."""
    import diffusers

    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    second = cls(**{key: value for key, value in pipe.components.items() if key in accepted})
    second.set_progress_bar_config(disable=True)
    return second


def image_to_image_pipeline(pipe: Any) -> Any:
    """The img2img pipeline over the same modules (weights, adapters and tokens shared),
    with the text-to-image pipeline's settings (SDXL's zeroed empty negative prompt)."""
    import diffusers

    cls = diffusers.StableDiffusionImg2ImgPipeline if isinstance(pipe, diffusers.StableDiffusionPipeline) \
        else diffusers.StableDiffusionXLImg2ImgPipeline
    accepted = inspect.signature(cls.__init__).parameters
    settings = {**{key: value for key, value in pipe.config.items() if not key.startswith("_")}, **pipe.components}
    settings.update(requires_safety_checker=False, add_watermarker=False)
    second = cls(**{key: value for key, value in settings.items() if key in accepted})
    second.set_progress_bar_config(disable=True)
    return second
