"""Hypernetwork files whose settings or key names ask for far larger modules than their
tensors: refused from the shapes alone, before any module is built.

`hypernetwork_from_model` is what `sdkit hypernet inspect` and `sdkit sample --hypernet`
read a file with; building a module for `layer_structure [1, 1e6, 1]` at width 768 would
allocate terabytes, so the tests forbid building any module until the file is accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sdkit.adapters.hypernet as hypernet
from sdkit.adapters.hypernet import read_hypernetwork
from sdkit.errors import SdkitError


def tiny_pair(width: int) -> tuple[dict, dict]:
    return ({"linear.0.weight": torch.zeros(2, 2)}, {"linear.0.weight": torch.zeros(2, 2)})


def expanded_pair(width: int) -> tuple[dict, dict]:
    """A (width, width) Linear over one stored element: stride 0, a few bytes on disk."""
    state = {"linear.0.weight": torch.zeros(1).expand(width, width),
             "linear.0.bias": torch.zeros(1).expand(width)}
    return (state, dict(state))


# name -> (pickled dict, fragment of the refusal)
AMPLIFYING = {
    "a 1e6 multiplier": ({768: tiny_pair(768), "layer_structure": [1, 1e6, 1]}, "does not match"),
    "a width of a million from the key": ({1_000_000: tiny_pair(1_000_000)}, "does not match"),
    "a width of 40 000 from the key": ({40_000: tiny_pair(40_000)}, "does not match"),
    "a 100 000-entry layer_structure": (
        {768: tiny_pair(768), "layer_structure": [1] + [2.0] * 100_000 + [1]},
        "(100002 entries)"),
    "an infinite size": ({768: tiny_pair(768), "layer_structure": [1, 1e308, 1]},
                         "is not a layer size"),
    "a huge width times a huge multiplier": (
        {10**17: tiny_pair(10**17), "layer_structure": [1, 1e300, 1]}, "is not a layer size"),
    "a NaN multiplier": ({768: tiny_pair(768), "layer_structure": [1, float("nan"), 1]},
                         "positive finite multipliers"),
    "an infinite multiplier": ({768: tiny_pair(768), "layer_structure": [1, float("inf"), 1]},
                               "positive finite multipliers"),
    # the pickle reader refuses a view claiming more elements than its storage holds
    "shared storage of 30 000 x 30 000": (
        {30_000: expanded_pair(30_000), "layer_structure": [1, 1]}, "claims 900000000 elements"),
}


@pytest.fixture
def no_module_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse_to_build(*_args, **_kwargs):
        raise AssertionError("a hypernetwork module was built before the file was accepted")

    monkeypatch.setattr(hypernet.HypernetworkModule, "__init__", refuse_to_build)


@pytest.mark.parametrize("case", list(AMPLIFYING))
def test_amplifying_files_refused_before_building(tmp_path: Path, case: str,
                                                  no_module_built: None) -> None:
    saved, fragment = AMPLIFYING[case]
    path = tmp_path / "hostile.pt"
    torch.save(saved, path)
    assert path.stat().st_size < 2_000_000
    with pytest.raises(SdkitError) as error:
        read_hypernetwork(path)
    message = str(error.value)
    assert message.startswith(str(path)) and fragment in message
    assert "\n" not in message and len(message) < 500


@pytest.mark.parametrize("case", ["a 100 000-entry layer_structure", "a width of a million from the key",
                                  "shared storage of 30 000 x 30 000"])
def test_cli_inspects_refuse_or_describe_in_bounds(tmp_path: Path, case: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from sdkit.cli.main import main

    path = tmp_path / "hostile.pt"
    torch.save(AMPLIFYING[case][0], path)
    with pytest.raises(SystemExit) as exit_info:
        main(["hypernet", "inspect", str(path)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and error.startswith("sdkit: error: ") and error.count("\n") == 1
    assert AMPLIFYING[case][1] in error
    if case.startswith("shared storage"):  # no valid checkpoint at all: describing it is refused too
        with pytest.raises(SystemExit) as exit_info:
            main(["inspect", "--json", str(path)])
        assert exit_info.value.code == 1 and AMPLIFYING[case][1] in capsys.readouterr().err
        return
    main(["inspect", "--json", str(path)])  # describing needs no module: it succeeds
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "hypernetwork"
    assert all(len(note) < 400 for note in report["notes"])


def test_the_file_size_bound_keeps_real_files(tmp_path: Path) -> None:
    # float16 tensors, as files are often saved: the float32 modules take twice the file
    settings = hypernet.HypernetworkSettings(layer_structure=(1, 2, 1))
    made = hypernet.new_hypernetwork("made", [768], settings, generator=torch.Generator().manual_seed(0))
    saved = hypernet.hypernetwork_object(made)
    saved[768] = tuple({key: tensor.half() for key, tensor in state.items()} for state in saved[768])
    path = tmp_path / "half.pt"
    torch.save(saved, path)
    again = read_hypernetwork(path)
    assert again.parameter_count == made.parameter_count
    for ours, theirs in zip(made.layers[768], again.layers[768]):
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
            assert torch.equal(a.half().float(), b)


@pytest.mark.parametrize("structure", [(1, 2, 1), (1, 1.5, 0.5, 1), (1, 1)])
@pytest.mark.parametrize("activation,norm,dropout", [
    ("linear", False, None), ("relu", True, None), ("prelu", True, (0, 0.1, 0.2, 0)),
    ("tanh", False, (0, 0.3, 0.3, 0))])
def test_shapes_known_before_building_are_the_built_ones(structure, activation, norm,
                                                         dropout) -> None:
    if dropout is not None and len(dropout) < len(structure):
        dropout = None
    settings = hypernet.HypernetworkSettings(
        layer_structure=structure, activation_func=activation, add_layer_norm=norm,
        activate_output=True, dropout_structure=dropout)
    built = hypernet.HypernetworkModule(24, settings)
    expected = {key: tuple(tensor.shape) for key, tensor in built.state_dict().items()}
    assert hypernet.parameter_shapes(24, settings) == expected
