"""Training state for `--resume`: written every `--save-every` steps, read back exactly.

A state folder holds `state.pt` (the trained parameters by name, the optimizer's moments,
the fp16 loss scaler, the losses so far, the step and the run's identity) and
`config.json` (the options of the run). The identity is what a state may only continue:
the base model (the sha256 of its file — the run computes it for the metadata anyway —
or, for a diffusers folder, a digest of its files' names and sizes), the training
pictures (a digest of their names, byte sizes and captions), the seed, batch size,
gradient accumulation, every data option that shapes the samples (resolution, buckets,
crop, filters, repeats, caption dropout, trigger) and the method's own options. A state
of another run is refused naming each difference; `--steps` and the learning rates may
change. The step number restores the rest exactly: every micro-step draws its noise,
timesteps, dropout masks and caption dropout from generators seeded by (seed, micro-step,
process), batch order comes from (seed, epoch), and the learning-rate schedule is
replayed to the step under the resumed run's own options (so `--steps` may grow). A
resumed run therefore ends with the same weights as an uninterrupted one.

The folder is built beside its final place and moved in when complete; `state.pt` holds
only tensors, numbers, strings and containers and is read back by sdkit's own restricted
unpickler (no pickled code runs; the same budgets as for any checkpoint), then checked
field by field, so that a damaged or crafted state is refused in one line before
training starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdkit.errors import SdkitError, with_article
from sdkit.io.output_path import build_in_partial
from sdkit.io.torch_checkpoint import load_torch_object
from sdkit.runtime.train.config import TrainConfig

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
_VERSION = 2
_METHOD_GROUPS = ("network", "embedding", "hypernet", "dreambooth")
_FREE_DATA_OPTIONS = ("folder", "cache", "cache_dir")  # where the data is and how latents are kept
# option labels that are not "--" + the field name
_LABELS = {"data.buckets": "buckets (--no-buckets)", "data.min_aspect": "--aspect-range minimum",
           "data.max_aspect": "--aspect-range maximum", "hypernet.dropout": "--hypernet-dropout"}
_DIGESTS = ("base model", "training pictures")  # identity entries "<kind>:<hex digest>"
_DIGEST_SHOWN = 12
_SCALER_FIELDS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # AdamW's per-parameter tensors


@dataclass
class TrainState:
    step: int
    parameters: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    losses: list[float]


def folder_digest(folder: Path) -> str:
    """sha256 over the names and byte sizes of every file under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())
    return digest.hexdigest()


def _label(group: str, name: str) -> str:
    return _LABELS.get(f"{group}.{name}", "--" + name.replace("_", "-"))


def run_identity(config: TrainConfig, base_digest: str, data_digest: str) -> dict[str, Any]:
    """What a state must share with the run that continues it: option label -> value."""
    options = config.to_json()
    identity: dict[str, Any] = {"method": config.method, "base model": base_digest,
                                "training pictures": data_digest, "--seed": config.run.seed,
                                "--batch-size": config.optim.batch_size, "--grad-accum": config.optim.grad_accum}
    for name, value in options["data"].items():
        if name not in _FREE_DATA_OPTIONS:
            identity[_label("data", name)] = value
    for group in _METHOD_GROUPS:
        for name, value in options.get(group, {}).items():
            identity[_label(group, name)] = value
    return identity


def _shown(label: str, value: Any) -> str:
    """An identity entry as a refusal shows it: digests shortened, options as JSON."""
    if label in _DIGESTS and isinstance(value, str):
        kind, _, digest = value.partition(":")
        return f"{kind} {digest[:_DIGEST_SHOWN]}"
    return json.dumps(value)


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'label: saved then, current now' for every entry that differs."""
    labels = list(saved) + [label for label in current if label not in saved]
    return [f"{label}: {_shown(label, saved.get(label))} then, {_shown(label, current.get(label))} now"
            for label in labels if saved.get(label) != current.get(label)]


def save_state(folder: Path, state: TrainState, config: TrainConfig, identity: dict[str, Any]) -> Path:
    payload = {"version": _VERSION, "step": state.step, "losses": list(state.losses),
               "parameters": {name: tensor.detach().cpu().clone() for name, tensor in state.parameters.items()},
               "optimizer": state.optimizer, "scaler": state.scaler, "identity": identity}

    def fill(partial: Path) -> None:
        torch.save(payload, partial / STATE_FILE)
        (partial / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2, sort_keys=True) + "\n")

    build_in_partial(folder, True, fill)
    return folder


def load_state(folder: Path, config: TrainConfig, identity: dict[str, Any]) -> TrainState:
    """The state saved in `folder`, refused when it belongs to a run of another `identity`."""
    try:
        payload = load_torch_object(folder / STATE_FILE)
    except OSError as exc:
        raise SdkitError(f"{folder}: not a readable training state ({exc.strerror or exc.__class__.__name__})"
                         ) from None
    _check_payload(folder, payload)
    if payload["version"] != _VERSION:
        raise SdkitError(f"{folder}: training state version {payload['version']} is not {_VERSION}")
    differences = identity_differences(payload["identity"], identity)
    if differences:
        raise SdkitError(f"{folder}: this state is from another run ({'; '.join(differences)}); only --steps "
                         "and the learning rates may change when resuming")
    if payload["step"] >= config.optim.steps:
        raise SdkitError(f"{folder}: the state is at step {payload['step']}; --steps {config.optim.steps} "
                         "leaves nothing to train")
    return TrainState(payload["step"], payload["parameters"], payload["optimizer"], payload["scaler"],
                      list(payload["losses"]))


# ---- what a state must hold (as save_state writes it) ------------------------------------

def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _is_json(value: Any) -> bool:
    """A value config.to_json() could have produced."""
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) is list:
        return all(_is_json(item) for item in value)
    return type(value) is dict and all(type(key) is str and _is_json(item) for key, item in value.items())


def _is_dict_of(value: Any, key_type: type, check: Any) -> bool:
    return isinstance(value, dict) and all(type(key) is key_type and check(item) for key, item in value.items())


def _optimizer_problem(saved: Any) -> str | None:
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list):
        return "the optimizer state is not a dict with 'state' and 'param_groups'"
    if not all(_is_dict_of(entry, str, lambda v: isinstance(v, torch.Tensor) or _is_number(v))
               and type(index) is int for index, entry in saved["state"].items()):
        return "the optimizer state holds something else than tensors and numbers per parameter"
    for group in saved["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) \
                or not all(type(index) is int for index in group["params"]):
            return "an optimizer parameter group has no list of parameter numbers"
    return None


def _problem(payload: dict[str, Any]) -> str | None:
    """What is wrong with a state's fields, or None."""
    step = payload.get("step")
    if type(step) is not int or step < 0:
        return "no step number"
    losses = payload.get("losses")
    if type(losses) is not list or len(losses) != step or not all(_is_number(loss) for loss in losses):
        return f"the losses are not a list of {step} numbers"
    if not _is_dict_of(payload.get("parameters"), str, lambda value: isinstance(value, torch.Tensor)):
        return "the parameters are not a dict of named tensors"
    scaler = payload.get("scaler")
    if scaler is not None and not (isinstance(scaler, dict) and
                                   all(_is_number(scaler.get(name)) for name in _SCALER_FIELDS)):
        return "the loss scaler state is not a dict of its numbers"
    if not _is_dict_of(payload.get("identity"), str, _is_json):
        return "the run identity is not a dict of options"
    return _optimizer_problem(payload.get("optimizer"))


def _check_payload(folder: Path, payload: Any) -> None:
    if not isinstance(payload, dict):
        raise SdkitError(f"{folder}: not a valid training state: {STATE_FILE} holds "
                         f"{with_article(type(payload).__name__)}, not a dict")
    if type(payload.get("version")) is not int:
        raise SdkitError(f"{folder}: not a valid training state: it has no version number")
    problem = _problem(payload) if payload["version"] == _VERSION else None
    if problem is not None:
        raise SdkitError(f"{folder}: not a valid training state: {problem}")


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
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise SdkitError(f"the saved optimizer state does not fit this run ({str(exc)[:200]})") from None
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
        group["initial_lr"] = own["lr"]
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            _check_moments(parameter, optimizer.state.get(parameter, {}))


def _check_moments(parameter: torch.nn.Parameter, state: dict[str, Any]) -> None:
    """AdamW's moments have their parameter's shape and its step is one number; anything
    else would fail (or broadcast silently) in the first optimizer step."""
    step = state.get("step")
    if isinstance(step, torch.Tensor) and step.numel() != 1:
        raise SdkitError(f"the saved optimizer state does not fit this run (a step count of shape {list(step.shape)})")
    for name in _MOMENTS:
        moment = state.get(name)
        if moment is not None and (not isinstance(moment, torch.Tensor) or moment.shape != parameter.shape):
            shape = list(moment.shape) if isinstance(moment, torch.Tensor) else type(moment).__name__
            raise SdkitError(f"the saved optimizer state does not fit this run ({name} {shape} for a "
                             f"parameter of shape {list(parameter.shape)})")
