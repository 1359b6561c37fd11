"""Training precision: what `--precision` means on this device, decided before accelerate.

- `fp32`: everything in float32.
- `bf16` / `fp16`: mixed precision through accelerate (autocast; fp16 also scales the loss
  with a GradScaler). Frozen weights are cast to the half type to save memory; trainable
  parameters stay float32 (diffusers' `cast_training_params`), which is what keeps fp16's
  GradScaler from failing with "Attempting to unscale FP16 gradients" (research: train.md
  §8). The VAE stays float32: SDXL's overflows in float16.
- `auto`: bf16 where the GPU supports it, else fp16 with loss scaling; float32 on CPU.

A choice the device cannot run is refused here with one line (accelerate would otherwise
stop with "bf16 mixed precision requires PyTorch >= 1.10 and a supported device").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdkit.errors import SdkitError

_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionPlan:
    name: str  # "fp32" | "fp16" | "bf16"
    frozen_dtype: torch.dtype  # frozen UNet / text-encoder weights
    note: str | None = None  # what `auto` chose, for the report

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for it."""
        return "no" if self.name == "fp32" else self.name


def _gpu_name() -> str:
    return torch.cuda.get_device_name(torch.cuda.current_device())


def resolve_precision(choice: str, device: torch.device) -> PrecisionPlan:
    """The precision plan for `choice` on `device`; SdkitError if it cannot run there."""
    cuda = device.type == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    if choice == "auto":
        if not cuda:
            return PrecisionPlan("fp32", torch.float32,
                                 f"--precision auto: training in fp32 on {device.type} (mixed precision needs a GPU)")
        if bf16:
            return PrecisionPlan("bf16", torch.bfloat16, "--precision auto: bf16 mixed precision")
        return PrecisionPlan("fp16", torch.float16, f"--precision auto: {_gpu_name()} has no bfloat16; "
                                                    "fp16 mixed precision with loss scaling")
    if choice == "fp32":
        return PrecisionPlan("fp32", torch.float32)
    if choice == "fp16" and not cuda:
        raise SdkitError(f"--precision fp16 needs a CUDA GPU; on {device.type} train with --precision fp32 "
                         "(or auto)")
    if choice == "bf16" and cuda and not bf16:
        raise SdkitError(f"--precision bf16: {_gpu_name()} does not support bfloat16; use --precision fp16 "
                         "(or auto)")
    if choice not in _HALF:
        raise SdkitError(f"--precision must be one of auto, fp32, fp16, bf16, not {choice!r}")
    return PrecisionPlan(choice, _HALF[choice])
