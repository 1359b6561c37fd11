"""The optimizers `--optimizer` names, built as kohya's sd-scripts builds them
(train_util.py `get_optimizer`) with sdkit's `--weight-decay`:

- adamw: torch's AdamW, betas (0.9, 0.999), eps 1e-8 (diffusers' trainers);
- adamw8bit: bitsandbytes' AdamW8bit, the same settings (CUDA only);
- prodigy: prodigyopt's Prodigy, which finds its own step size — `--lr` is a multiplier
  of it, about 1.0 (kohya warns below 0.1), and only the first group's rate counts;
- lion: lion-pytorch's Lion (lr usually 3-10x below AdamW's);
- adafactor: transformers' Adafactor with kohya's defaults: relative_step=True,
  scale_parameter=True, warmup_init=False and no fixed learning rate; its schedule is
  transformers' `AdafactorSchedule` started at `--lr` (kohya's `adafactor:LR` scheduler),
  so per-part rates and other schedulers do not apply.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch

from sdkit.errors import SdkitError

# the class each optimizer is, as kohya's ss_optimizer metadata names it (module.Class)
OPTIMIZER_CLASSES = {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit",
                     "prodigy": "prodigyopt.prodigy.Prodigy", "lion": "lion_pytorch.lion_pytorch.Lion",
                     "adafactor": "transformers.optimization.Adafactor"}
ADAFACTOR_SETTINGS = {"relative_step": True, "scale_parameter": True, "warmup_init": False}


def build_optimizer(groups: list[dict[str, Any]], name: str, lr: float, weight_decay: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `name` over the parameter groups (each with its own "lr")."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if name == "adamw8bit":
        if device.type != "cuda":
            raise SdkitError("--optimizer adamw8bit runs on CUDA GPUs only; use --optimizer adamw here")
        import bitsandbytes  # present: check_config made sure

        return bitsandbytes.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if name == "prodigy":
        from prodigyopt import Prodigy

        with contextlib.redirect_stdout(io.StringIO()):  # it prints its weight-decay mode, spoiling --json
            return Prodigy(groups, lr=lr, weight_decay=weight_decay)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        plain = [{key: value for key, value in group.items() if key != "lr"} for group in groups]
        return Adafactor(plain, lr=None, weight_decay=weight_decay, **ADAFACTOR_SETTINGS)
    raise SdkitError(f"unknown optimizer {name!r}")


def adafactor_schedule(optimizer: torch.optim.Optimizer, initial_lr: float) -> Any:
    """transformers' AdafactorSchedule: reports the step sizes Adafactor picks itself."""
    from transformers.optimization import AdafactorSchedule

    return AdafactorSchedule(optimizer, initial_lr)


def current_lr(optimizer: torch.optim.Optimizer, scheduler: Any, group: int = 0) -> float | None:
    """A group's learning rate now (Adafactor's groups hold none: its schedule knows)."""
    rate = optimizer.param_groups[group].get("lr")
    if rate is None and scheduler is not None:
        rate = scheduler.get_last_lr()[group]
    return float(rate) if rate is not None else None
