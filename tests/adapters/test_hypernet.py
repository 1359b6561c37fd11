"""A1111 hypernetworks: reading the webui's files, the attention hook, the writer.

The reference below is the webui's module math written out by hand for two files (one
with layer norm, one with dropout and an activated output, whose dropout layers shift
the module indices): the contexts our attached processor hands to `to_k` / `to_v`
must equal it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdkit.adapters.hypernet import (
    HypernetworkSettings,
    new_hypernetwork,
    read_hypernetwork,
    save_hypernetwork,
)
from sdkit.errors import SdkitError
from sdkit.runtime.hypernet_attn import HypernetAttnProcessor, attach_hypernetwork, detach_hypernetwork

TEXT_WIDTH = 12
SIZES = (8, TEXT_WIDTH)  # attn1 of the 8-channel blocks and every attn2; the 16-channel attn1 passes

# file settings -> (state-dict keys with shapes for width d, hand-written forward of the MLP)
Reference = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def layer_norm_file(d: int) -> tuple[dict[str, tuple[int, ...]], Reference]:
    """[1, 2, 1], relu, layer norm, no output activation:
    Linear, ReLU, LayerNorm, Linear, LayerNorm -> linear.0 / .2 / .3 / .4"""
    shapes = {"linear.0.weight": (2 * d, d), "linear.0.bias": (2 * d,), "linear.2.weight": (2 * d,),
              "linear.2.bias": (2 * d,), "linear.3.weight": (d, 2 * d), "linear.3.bias": (d,),
              "linear.4.weight": (d,), "linear.4.bias": (d,)}

    def mlp(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ s["linear.0.weight"].T + s["linear.0.bias"])
        h = F.layer_norm(h, (2 * d,), s["linear.2.weight"], s["linear.2.bias"])
        h = h @ s["linear.3.weight"].T + s["linear.3.bias"]
        return F.layer_norm(h, (d,), s["linear.4.weight"], s["linear.4.bias"])

    return shapes, mlp


def dropout_file(d: int) -> tuple[dict[str, tuple[int, ...]], Reference]:
    """[1, 1.5, 2, 1], swish (= Hardswish), dropout flags with last-layer dropout, activated
    output: Linear, Hardswish, Dropout, Linear, Hardswish, Dropout, Linear, Hardswish."""
    wide, wider = int(1.5 * d), 2 * d
    shapes = {"linear.0.weight": (wide, d), "linear.0.bias": (wide,), "linear.3.weight": (wider, wide),
              "linear.3.bias": (wider,), "linear.6.weight": (d, wider), "linear.6.bias": (d,)}

    def mlp(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = F.hardswish(x @ s["linear.0.weight"].T + s["linear.0.bias"])
        h = F.hardswish(h @ s["linear.3.weight"].T + s["linear.3.bias"])
        return F.hardswish(h @ s["linear.6.weight"].T + s["linear.6.bias"])

    return shapes, mlp


FILES = {
    "layer-norm": (layer_norm_file, {"layer_structure": [1, 2, 1], "activation_func": "relu",
                                     "is_layer_norm": True, "activate_output": False, "use_dropout": False,
                                     "dropout_structure": [0, 0, 0], "last_layer_dropout": False}),
    "dropout": (dropout_file, {"layer_structure": [1, 1.5, 2, 1], "activation_func": "swish",
                               "is_layer_norm": False, "activate_output": True, "use_dropout": True,
                               "last_layer_dropout": True}),
}


def random_state(shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> OrderedDict:
    state = OrderedDict((key, torch.randn(*shape, generator=generator) * 0.3)
                        for key, shape in shapes.items())
    state._metadata = OrderedDict({"": {"version": 1}})  # pickled along, as by Module.state_dict()
    return state


def write_webui_file(path: Path, kind: str, seed: int = 0) -> dict[int, tuple[dict, dict, Reference]]:
    """A .pt laid out as the webui's Hypernetwork.save writes it; returns per width
    (key state, value state, reference MLP)."""
    build, settings = FILES[kind]
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for width in SIZES:
        shapes, mlp = build(width)
        layers[width] = (random_state(shapes, generator), random_state(shapes, generator), mlp)
    saved = {width: (k, v) for width, (k, v, _) in layers.items()}
    saved.update({"step": 42, "name": kind, "weight_initialization": "Normal", "sd_checkpoint": "0123abcd",
                  "sd_checkpoint_name": "tiny", **settings})
    torch.save(saved, path)
    return layers


def reference(layers: dict, strength: float) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """context -> context for to_k (which=0) or to_v (which=1), per the webui's math."""
    def transform(context: torch.Tensor, which: int) -> torch.Tensor:
        entry = layers.get(context.shape[-1])
        if entry is None:
            return context
        return context + entry[2](entry[which], context) * strength

    return transform


@pytest.fixture(scope="module")
def unet_template() -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=4, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")).eval()


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 500]),
            torch.randn(2, 5, TEXT_WIDTH, generator=generator))


def run_with_capture(unet: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Every attention's inputs to to_q / to_k / to_v during one forward."""
    from diffusers.models.attention_processor import Attention

    captured: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            for proj in ("to_q", "to_k", "to_v"):
                def hook(_m, args, name=name, proj=proj):
                    captured.setdefault(name, {})[proj] = args[0].detach().clone()
                handles.append(getattr(module, proj).register_forward_pre_hook(hook))
    sample, timestep, text = unet_inputs()
    with torch.no_grad():
        unet(sample, timestep, text)
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize("kind", sorted(FILES))
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_attached_contexts_follow_webui_math(unet_template: nn.Module, tmp_path: Path, kind: str,
                                             strength: float) -> None:
    path = tmp_path / f"{kind}.pt"
    expected = reference(write_webui_file(path, kind), strength)
    attach_hypernetwork(unet_template, read_hypernetwork(path), strength)
    try:
        captured = run_with_capture(unet_template)
    finally:
        detach_hypernetwork(unet_template)
    text = unet_inputs()[2]
    passed_through = changed = 0
    for name, inputs in captured.items():
        context = inputs["to_q"] if name.endswith("attn1") else text
        for which, proj in enumerate(("to_k", "to_v")):
            torch.testing.assert_close(inputs[proj], expected(context, which), rtol=1e-5, atol=1e-6)
        passed_through += torch.equal(inputs["to_k"], context)
        changed += not torch.allclose(inputs["to_k"], context, atol=1e-3)
    wide = sum(name.endswith("attn1") and inputs["to_q"].shape[-1] == 16 for name, inputs in captured.items())
    assert wide > 0 and passed_through == wide and changed == len(captured) - wide


def test_old_linear1_linear2_keys_and_defaults(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    shapes = {"linear1.weight": (16, 8), "linear1.bias": (16,),
              "linear2.weight": (8, 16), "linear2.bias": (8,)}
    states = [random_state(shapes, generator) for _ in range(2)]
    path = tmp_path / "old.pt"
    torch.save({8: tuple(states)}, path)
    hn = read_hypernetwork(path)
    assert hn.settings.layer_structure == (1, 2, 1) and hn.name == "old" and hn.step == 0
    x = torch.randn(3, 8, generator=generator)
    s = states[1]
    hidden = x @ s["linear1.weight"].T + s["linear1.bias"]
    expected = x + (hidden @ s["linear2.weight"].T + s["linear2.bias"]) * 0.7
    with torch.no_grad():
        torch.testing.assert_close(hn.layers[8][1](x, 0.7), expected)


def test_unet_output_changes_and_strength_zero_is_bitwise_identity(unet_template: nn.Module,
                                                                    tmp_path: Path) -> None:
    path = tmp_path / "hn.pt"
    write_webui_file(path, "layer-norm")
    hn = read_hypernetwork(path)
    sample, timestep, text = unet_inputs()
    originals = [type(p) for p in unet_template.attn_processors.values()]

    def output() -> torch.Tensor:
        with torch.no_grad():
            return unet_template(sample, timestep, text).sample

    baseline = output()
    attach_hypernetwork(unet_template, hn, 0.0)
    assert all(isinstance(p, HypernetAttnProcessor) for p in unet_template.attn_processors.values())
    assert torch.equal(output(), baseline)
    detach_hypernetwork(unet_template)
    attach_hypernetwork(unet_template, hn, 1.0)
    assert not torch.allclose(output(), baseline, atol=1e-4)
    detach_hypernetwork(unet_template)
    assert [type(p) for p in unet_template.attn_processors.values()] == originals
    assert torch.equal(output(), baseline)


def test_other_attention_processors_are_refused(unet_template: nn.Module, tmp_path: Path) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    write_webui_file(tmp_path / "hn.pt", "layer-norm")
    unet_template.set_attn_processor(AttnProcessor())
    try:
        with pytest.raises(SdkitError, match="uses AttnProcessor"):
            attach_hypernetwork(unet_template, read_hypernetwork(tmp_path / "hn.pt"))
    finally:
        unet_template.set_attn_processor(AttnProcessor2_0())


def test_hypernetworks_chain_in_order(unet_template: nn.Module, tmp_path: Path) -> None:
    first = reference(write_webui_file(tmp_path / "a.pt", "layer-norm", seed=1), 1.0)
    second = reference(write_webui_file(tmp_path / "b.pt", "dropout", seed=2), 0.5)
    hn_a, hn_b = read_hypernetwork(tmp_path / "a.pt"), read_hypernetwork(tmp_path / "b.pt")
    attach_hypernetwork(unet_template, hn_a, 1.0)
    attach_hypernetwork(unet_template, hn_b, 0.5)
    try:
        captured = run_with_capture(unet_template)
        detach_hypernetwork(unet_template, hn_a)
        only_b = run_with_capture(unet_template)
    finally:
        detach_hypernetwork(unet_template)
    text = unet_inputs()[2]
    attn2 = next(name for name in captured if name.endswith("attn2"))
    for which, proj in enumerate(("to_k", "to_v")):
        chained = second(first(text, which), which)
        torch.testing.assert_close(captured[attn2][proj], chained, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(only_b[attn2][proj], second(text, which), rtol=1e-5, atol=1e-6)


def test_written_pt_reloads_to_identical_modules(tmp_path: Path) -> None:
    settings = HypernetworkSettings(layer_structure=(1, 2, 2, 1), activation_func="prelu",
                                    add_layer_norm=True, activate_output=True,
                                    dropout_structure=(0, 0.1, 0.2, 0), weight_init="XavierNormal")
    hn = new_hypernetwork("made", [8, 12], settings, generator=torch.Generator().manual_seed(0))
    hn.step, hn.sd_checkpoint_name = 7, "tiny"
    path = save_hypernetwork(tmp_path / "made.pt", hn)
    again = read_hypernetwork(path)
    assert (again.name, again.step, again.sd_checkpoint_name, again.sizes) == ("made", 7, "tiny", [8, 12])
    assert again.settings.layer_structure == settings.layer_structure
    assert again.settings.dropouts() == settings.dropouts() and again.settings.add_layer_norm
    for width in (8, 12):
        for ours, theirs in zip(hn.layers[width], again.layers[width]):
            assert repr(ours) == repr(theirs)
            for (key, a), (key_b, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
                assert key == key_b and torch.equal(a, b)
    raw = torch.load(path, weights_only=True)
    assert {8, 12} <= set(raw) and raw["is_layer_norm"] is True and raw["activation_func"] == "prelu"
    assert raw["dropout_structure"] == [0, 0.1, 0.2, 0] and raw["last_layer_dropout"] is True
    assert "linear.1.weight" in raw[8][0]  # PReLU's parameter sits at index 1, after linear.0
    with pytest.raises(SdkitError, match="already exists"):
        save_hypernetwork(path, hn)
    with pytest.raises(SdkitError, match="only from .pt"):
        save_hypernetwork(tmp_path / "made.safetensors", hn)


@pytest.mark.parametrize("change,message", [
    ({"layer_structure": [2, 1]}, "must start and end with 1"),
    ({"activation_func": "nope"}, "unknown hypernetwork activation 'nope'"),
    ({"activation_func": "multiheadattention"}, "cannot be built without arguments"),
    ({"is_layer_norm": False}, "does not match layer_structure"),
    ({"dropout_structure": [0, 1.5, 0]}, "dropout_structure"),
    ({"weight_initialization": "Uniform"}, "unknown weight_initialization"),
])
def test_refusals(tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "bad.pt"
    write_webui_file(path, "layer-norm")
    saved = torch.load(path, weights_only=True)
    saved.update(change)
    torch.save(saved, path)
    with pytest.raises(SdkitError, match=message):
        read_hypernetwork(path)


def test_missing_value_module_refused(tmp_path: Path) -> None:
    path = tmp_path / "half.pt"
    torch.save({8: [{"linear.0.weight": torch.zeros(16, 8)}]}, path)
    with pytest.raises(SdkitError, match="lacks its value module"):
        read_hypernetwork(path)


def test_cli_inspect_and_bake(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sdkit.cli.hypernet_cmd  # noqa: F401  (attaches the group)
    from sdkit.cli.main import main

    path = tmp_path / "styled.pt"
    layers = write_webui_file(path, "layer-norm")
    main(["hypernet", "inspect", str(path), "--json"])
    report = json.loads(capsys.readouterr().out)
    parameters = sum(t.numel() for k, v, _ in layers.values() for t in [*k.values(), *v.values()])
    assert report["parameters"] == parameters and report["sizes"] == list(SIZES)
    assert (report["activation"], report["layer_norm"], report["step"]) == ("relu", True, 42)
    assert report["layer_structure"] == [1, 2, 1] and report["dropout"] == [0, 0, 0]
    main(["hypernet", "inspect", str(path)])
    assert "ReLU" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["hypernet", "bake", "model.safetensors", str(path), "-o", "out.safetensors"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and error.count("\n") == 1
    assert "cannot be baked" in error and "sdkit sample --hypernet" in error and str(path) in error
