"""Training states for `train --resume`: read by sdkit's restricted unpickler (no pickled
code runs, the same budgets as any checkpoint) and checked field by field. A state
written by a run loads back exactly; a damaged, crafted or hostile one is refused in one
line before training starts — never a crash, a traceback, or torch's advice to load it
with weights_only=False."""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from faults_cli import CliServer
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "io"))  # the hostile pickle builders
from hostile_pickles import (Raw, deep_lists_filled_late, get, glob, nesting, put, state_dict_pickle,  # noqa: E402
                             storage_ref, tensor_call, text, torch_file, zip_file)

from sdkit.errors import SdkitError  # noqa: E402
from sdkit.runtime.train.config import DataOptions, OptimOptions, TrainConfig  # noqa: E402
from sdkit.runtime.train.state import (TrainState, load_state, restore_optimizer, run_identity,  # noqa: E402
                                       save_state)


def config_for(tmp_path: Path, steps: int = 4) -> TrainConfig:
    return TrainConfig("lora", tmp_path / "base.safetensors", tmp_path / "out.safetensors",
                       DataOptions(tmp_path / "data"), optim=OptimOptions(steps=steps))


def trained_state(steps: int = 2) -> tuple[torch.nn.Module, TrainState]:
    """A module and the state of `steps` AdamW steps on it."""
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        loss = module(torch.full((2, 3), float(step + 1))).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    parameters = dict(module.named_parameters())
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 1}
    return module, TrainState(steps, parameters, optimizer.state_dict(), scaler, losses)


def test_a_saved_state_loads_back_exactly(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    identity = run_identity(config, "sha256:" + "a" * 64, "sha256:" + "b" * 64)
    module, state = trained_state()
    save_state(tmp_path / "state", state, config, identity)
    loaded = load_state(tmp_path / "state", config, identity)
    assert loaded.step == 2 and loaded.losses == state.losses and loaded.scaler == state.scaler
    assert all(torch.equal(loaded.parameters[name], value) for name, value in state.parameters.items())
    assert loaded.optimizer["param_groups"] == state.optimizer["param_groups"]
    for index, moments in state.optimizer["state"].items():
        assert all(torch.equal(loaded.optimizer["state"][index][key], value) for key, value in moments.items())
    fresh = torch.optim.AdamW(module.parameters(), lr=5e-3)
    restore_optimizer(fresh, loaded.optimizer)
    assert fresh.param_groups[0]["lr"] == 5e-3
    first = next(iter(module.parameters()))
    assert torch.equal(fresh.state[first]["exp_avg"], state.optimizer["state"][0]["exp_avg"])


def valid_payload(tmp_path: Path) -> tuple[dict[str, Any], TrainConfig, dict[str, Any]]:
    config = config_for(tmp_path)
    identity = run_identity(config, "sha256:" + "a" * 64, "sha256:" + "b" * 64)
    _, state = trained_state()
    payload = {"version": 2, "step": state.step, "losses": state.losses, "parameters": state.parameters,
               "optimizer": state.optimizer, "scaler": state.scaler, "identity": identity}
    return payload, config, identity


MALFORMED = {  # name: (change to a valid payload, what the refusal says)
    "not a dict": (lambda p: [p], "holds a list, not a dict"),
    "no version": (lambda p: {k: v for k, v in p.items() if k != "version"}, "no version number"),
    "version as text": (lambda p: {**p, "version": "2"}, "no version number"),
    "another version": (lambda p: {**p, "version": 1}, "version 1 is not 2"),
    "step as text": (lambda p: {**p, "step": "2"}, "no step number"),
    "negative step": (lambda p: {**p, "step": -1}, "no step number"),
    "missing step": (lambda p: {k: v for k, v in p.items() if k != "step"}, "no step number"),
    "losses too short": (lambda p: {**p, "losses": [0.5]}, "losses are not a list of 2 numbers"),
    "losses of text": (lambda p: {**p, "losses": ["a", "b"]}, "losses are not a list of 2 numbers"),
    "parameters as lists": (lambda p: {**p, "parameters": {"w": [1.0]}}, "parameters are not a dict"),
    "parameters by number": (lambda p: {**p, "parameters": {0: torch.ones(1)}}, "parameters are not a dict"),
    "optimizer as a list": (lambda p: {**p, "optimizer": [1]}, "optimizer state is not a dict"),
    "optimizer without groups": (lambda p: {**p, "optimizer": {"state": {}}}, "optimizer state is not a dict"),
    "optimizer state of lists": (lambda p: {**p, "optimizer": {**p["optimizer"], "state": {0: {"exp_avg": [1]}}}},
                                 "tensors and numbers per parameter"),
    "parameter numbers as text": (lambda p: {**p, "optimizer": {**p["optimizer"], "param_groups": [{"params": ["0"]}]}},
                                  "no list of parameter numbers"),
    "scaler without its scale": (lambda p: {**p, "scaler": {"growth_factor": 2.0}}, "loss scaler state"),
    "identity with a set": (lambda p: {**p, "identity": {**p["identity"], "--seed": {1, 2}}}, "run identity"),
    "identity as a list": (lambda p: {**p, "identity": [1]}, "run identity"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_states_are_refused_in_one_line(tmp_path: Path, case: str) -> None:
    payload, config, identity = valid_payload(tmp_path)
    change, said = MALFORMED[case]
    folder = tmp_path / "state"
    folder.mkdir()
    torch.save(change(payload), folder / "state.pt")
    with pytest.raises(SdkitError) as error:
        load_state(folder, config, identity)
    message = str(error.value)
    assert message.startswith(f"{folder}: ") and said in message and "\n" not in message, message


def tensor_key_state(path: Path) -> Path:
    weight = tensor_call(storage_ref("0", 1), 0, (1,), (1,))
    return zip_file(path, state_dict_pickle({"parameters": b"}" + weight + b"Ns"}), {"0": bytes(4)})


def looped_state(path: Path) -> Path:
    weight = tensor_call(storage_ref("0", 1), 0, (1,), (1,))
    loop = b"]" + put(0) + b"(" + weight + get(0) + b"e"  # a list holding a tensor and itself
    return zip_file(path, state_dict_pickle({"parameters": loop}), {"0": bytes(4)})


def broadcast_state(path: Path) -> Path:
    view = tensor_call(storage_ref("0", 1), 0, (4096, 4096), (0, 0))
    return zip_file(path, state_dict_pickle({"parameters": b"}" + text("w") + view + b"s"}),
                    {"0": bytes(4)})


def forbidden_global_state(path: Path) -> Path:
    """A genuine torch.save archive calling os.system("true")."""
    return torch_file(path, Raw(glob("os", "system") + b"(" + text("true") + b"tR"))


def garbage_state(path: Path) -> Path:
    path.write_bytes(bytes(64))
    return path


HOSTILE = {  # name: (writer of state.pt, what the refusal says)
    "a million nested tuples": (lambda path: torch_file(path, nesting("tuple-key")), "nested more than 200 levels"),
    # in-process (the million above crashes a reader that hashes it; the command test runs it)
    "nested tuples": (lambda path: torch_file(path, nesting("tuple-key", 5000)), "nested more than 200 levels"),
    "lists nested deep, filled late": (lambda path: torch_file(path, deep_lists_filled_late(1000)),
                                       "nested deeper than 100 levels"),
    "a forbidden global": (forbidden_global_state, "forbidden global 'os.system' (sdkit loads tensors, plain "
                                                   "containers, numbers and strings"),
    "a broadcast view": (broadcast_state, "claims 16777216 elements"),
    "a tensor as a dict key": (tensor_key_state, "a tensor is used as a dict key"),
    "a list holding itself": (looped_state, "contains itself"),
    "not a pickle at all": (garbage_state, "not a PyTorch checkpoint"),
}


@pytest.mark.parametrize("case", sorted(set(HOSTILE) - {"a million nested tuples"}))
def test_hostile_states_are_refused_in_one_line(tmp_path: Path, case: str) -> None:
    _, config, identity = valid_payload(tmp_path)
    write, said = HOSTILE[case]
    folder = tmp_path / "state"
    folder.mkdir()
    write(folder / "state.pt")
    with pytest.raises(SdkitError) as error:
        load_state(folder, config, identity)
    message = str(error.value)
    assert said in message and "\n" not in message and "weights_only" not in message, message


@pytest.mark.parametrize("moment,shape", [("exp_avg", (5,)), ("exp_avg_sq", (4, 4)), ("step", (3,))])
def test_optimizer_moments_of_other_shapes_are_refused(tmp_path: Path, moment: str, shape: tuple[int, ...]) -> None:
    module, state = trained_state()
    saved = state.optimizer
    saved["state"][0][moment] = torch.zeros(shape)
    with pytest.raises(SdkitError, match="the saved optimizer state does not fit this run"):
        restore_optimizer(torch.optim.AdamW(module.parameters()), saved)


# ---- through the command -------------------------------------------------------------------

@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    for index, colour in enumerate([(200, 20, 20), (20, 200, 20)]):
        Image.new("RGB", (64, 64), colour).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text("a square")
    return folder


@pytest.mark.parametrize("case", ["a million nested tuples", "a forbidden global", "missing fields"])
def test_train_resume_refuses_hostile_states(cli: CliServer, fault_inputs: dict[str, Path], pictures: Path,
                                             tmp_path: Path, case: str) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    if case in HOSTILE:
        HOSTILE[case][0](folder / "state.pt")
    else:
        torch.save(OrderedDict(version=2), folder / "state.pt")  # a dict, yet missing every field
    output = tmp_path / "out.safetensors"
    result = cli.run("train", "lora", "--base", str(fault_inputs["a"]), "--data", str(pictures), "-o", str(output),
                     "--resume", str(folder), "--steps", "2")
    assert result.status == 1, (result.status, result.stderr)
    lines = result.error_lines
    assert len(lines) == 1 and lines[0].startswith("sdkit: error: "), result.stderr
    assert "Traceback" not in result.stderr and "rerun with --debug" not in lines[0]
    assert "weights_only" not in result.stderr
    assert not output.exists()
