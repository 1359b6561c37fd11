"""Training state for `--resume`: written every `--save-every` steps, read back exactly.

A state folder holds `state.pt` (the trained parameters by name, the optimizer's moments,
the fp16 loss scaler, the losses so far and the step) and `config.json` (the options of
the run). The step number restores the rest exactly: every micro-step draws its noise,
timesteps, dropout masks and caption dropout from generators seeded by (seed, micro-step,
process), batch order comes from (seed, epoch), and the learning-rate schedule is
replayed to the step under the resumed run's own options (so `--steps` may grow). A
resumed run therefore ends with the same weights as an uninterrupted one.

The folder is built beside its final place and moved in when complete; `state.pt` holds
only tensors, numbers, strings and containers and is read with `weights_only=True`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdkit.errors import SdkitError
from sdkit.ops.convert_folder import build_in_partial
from sdkit.runtime.train.config import TrainConfig

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
_VERSION = 1
# what must match for a state to continue a run: the method and what shapes the trained part
_MUST_MATCH = ("method", "network", "embedding", "hypernet", "dreambooth")


@dataclass
class TrainState:
    step: int
    parameters: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    losses: list[float]


def save_state(folder: Path, state: TrainState, config: TrainConfig) -> Path:
    payload = {"version": _VERSION, "step": state.step, "losses": list(state.losses),
               "parameters": {name: tensor.detach().cpu().clone() for name, tensor in state.parameters.items()},
               "optimizer": state.optimizer, "scaler": state.scaler}

    def fill(partial: Path) -> None:
        torch.save(payload, partial / STATE_FILE)
        (partial / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2, sort_keys=True) + "\n")

    build_in_partial(folder, True, fill)
    return folder


def load_state(folder: Path, config: TrainConfig) -> TrainState:
    """The state saved in `folder`, refused when it belongs to a different run."""
    try:
        saved_config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        payload = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise SdkitError(f"{folder}: not a readable training state ({exc.__class__.__name__})") from None
    if payload.get("version") != _VERSION:
        raise SdkitError(f"{folder}: training state version {payload.get('version')} is not {_VERSION}")
    current = config.to_json()
    for key in _MUST_MATCH:
        if saved_config.get(key) != current.get(key):
            raise SdkitError(f"{folder}: this state was saved by a run with other {key} options "
                             f"({saved_config.get(key)} vs {current.get(key)})")
    if payload["step"] >= config.optim.steps:
        raise SdkitError(f"{folder}: the state is at step {payload['step']}; --steps {config.optim.steps} "
                         "leaves nothing to train")
    return TrainState(payload["step"], payload["parameters"], payload["optimizer"], payload["scaler"],
                      list(payload["losses"]))


def restore_parameters(named: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor], folder: Path) -> None:
    if set(named) != set(saved):
        missing = sorted(set(named) ^ set(saved))
        raise SdkitError(f"{folder}: the saved parameters do not match this model's (e.g. {missing[0]})")
    with torch.no_grad():
        for name, parameter in named.items():
            if parameter.shape != saved[name].shape:
                raise SdkitError(f"{folder}: parameter {name} has shape {list(saved[name].shape)}, "
                                 f"the model's {list(parameter.shape)}")
            parameter.copy_(saved[name])


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """The saved moments and step counts; learning rates and decay from this run's options."""
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as exc:
        raise SdkitError(f"the saved optimizer state does not fit this run ({exc})") from None
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
        group["initial_lr"] = own["lr"]
