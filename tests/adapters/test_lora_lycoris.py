"""Every algorithm lycoris-lora can train, saved with its own `save_weights`, parsed by
sdkit and merged: each adapted layer must give the same output as LyCORIS' forward pass
(its merge path applies the LoHa/LoKr scale twice, so the forward is the reference)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdkit.adapters.lora_format import parse_lora
from sdkit.io import open_model

pytestmark = pytest.mark.usefixtures("single_thread")
TOLERANCE = 1e-5
# (id, algo, network kwargs, strength). Wherever alpha applies it differs from the rank,
# so a scale applied twice (or not at all) shows.
CASES = [
    ("lora", "lora", dict(lora_dim=4, alpha=2, conv_lora_dim=0), 0.7),
    ("locon", "locon", dict(lora_dim=4, alpha=2, conv_lora_dim=3, conv_alpha=1.5), 1.0),
    ("locon-tucker", "locon", dict(lora_dim=4, alpha=2, conv_lora_dim=3, conv_alpha=1,
                                   use_tucker=True), 0.6),
    ("loha", "loha", dict(lora_dim=4, alpha=2, conv_lora_dim=4, conv_alpha=1), 0.8),
    ("loha-tucker", "loha", dict(lora_dim=4, alpha=3, conv_lora_dim=4, conv_alpha=1,
                                 use_tucker=True), 1.0),
    ("lokr", "lokr", dict(lora_dim=2, alpha=3, conv_lora_dim=2, conv_alpha=1), 0.9),
    ("lokr-both-factored", "lokr", dict(lora_dim=1, alpha=3, conv_lora_dim=1, conv_alpha=0.5,
                                        decompose_both=True), 1.0),
    ("lokr-full-factors", "lokr", dict(lora_dim=4, alpha=3, conv_lora_dim=4, conv_alpha=3,
                                       full_matrix=True), 0.5),
    ("lokr-factor", "lokr", dict(lora_dim=2, alpha=1, conv_lora_dim=2, conv_alpha=1,
                                 factor=4), 1.0),
    ("lokr-tucker", "lokr", dict(lora_dim=2, alpha=3, conv_lora_dim=2, conv_alpha=1,
                                 use_tucker=True), 1.0),
    ("ia3", "ia3", dict(lora_dim=4, alpha=1, conv_lora_dim=4), 0.8),
    ("ia3-on-input", "ia3", dict(lora_dim=4, alpha=1, conv_lora_dim=4, train_on_input=True), 1.0),
    ("full", "full", dict(lora_dim=4, alpha=1, conv_lora_dim=4), 0.7),
    ("glora", "glora", dict(lora_dim=4, alpha=2, conv_lora_dim=4, conv_alpha=3), 0.9),
    ("diag-oft", "diag-oft", dict(lora_dim=4, alpha=1, conv_lora_dim=4), 0.8),
    ("diag-oft-constrained", "diag-oft", dict(lora_dim=8, conv_lora_dim=8, constraint=1e-3,
                                              rescaled=True), 1.0),
    ("boft", "boft", dict(lora_dim=4, alpha=1, conv_lora_dim=4), 0.7),
    ("boft-constrained", "boft", dict(lora_dim=2, conv_lora_dim=2, constraint=2e-3,
                                      rescaled=True), 1.0),
    ("lora+norm", "lora", dict(lora_dim=4, alpha=8, conv_lora_dim=0, train_norm=True), 0.6),
    ("dora", "lora", dict(lora_dim=4, alpha=2, conv_lora_dim=4, conv_alpha=1,
                          weight_decompose=True), 1.0),
    ("dora-input-axis", "lora", dict(lora_dim=4, alpha=2, conv_lora_dim=4,
                                     weight_decompose=True, wd_on_out=False), 1.0),
    ("doha", "loha", dict(lora_dim=4, alpha=2, conv_lora_dim=4, weight_decompose=True), 1.0),
    ("dokr", "lokr", dict(lora_dim=2, alpha=3, conv_lora_dim=2, weight_decompose=True), 1.0),
]
EXPECTED_TYPES = {"lora": {"lora"}, "locon": {"lora"}, "loha": {"loha"}, "lokr": {"lokr"},
                  "ia3": {"ia3"}, "full": {"full"}, "glora": {"glora"}, "diag-oft": {"oft"},
                  "boft": {"boft"}}


def save(network, tmp_path) -> Path:
    path = tmp_path / "adapter.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return path


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_merged_layers_match_lycoris_forward(case, lycoris_network, forward_check, tmp_path):
    _, algo, kwargs, strength = case
    network, layers = lycoris_network(algo, multiplier=strength, **kwargs)
    with open_model(save(network, tmp_path)) as model_file:
        parsed = parse_lora(model_file)
        assert parsed.metadata["ss_network_module"] == "lycoris.kohya"
        assert not parsed.unrecognised
        assert parsed.prefix_style == "kohya"
        assert set(parsed.modules) == set(layers)
        types = set(parsed.type_counts())
        assert types == EXPECTED_TYPES[algo] | ({"norm"} if kwargs.get("train_norm") else set())
        if kwargs.get("weight_decompose"):
            assert all(m.dora_scale is not None for m in parsed.modules.values())
        for lora_name, adapted in layers.items():
            error, effect = forward_check(adapted, parsed.modules[lora_name], strength)
            assert effect > 1e-3, f"{lora_name}: the adapter barely changes the output"
            assert error < TOLERANCE, f"{lora_name}: {error:.2e}"


def test_dylora_file_reads_as_the_lora_lycoris_loads(lycoris_network, snapshot, forward_check,
                                                     tmp_path, unet_template):
    """DyLoRA trains a random rank per step; its file is a plain LoRA of full rank.
    LyCORIS' own loader turns that file into LoCon modules: they are the reference."""
    from lycoris.wrapper import create_lycoris_from_weights

    network, _ = lycoris_network("dylora", lora_dim=4, alpha=2, conv_lora_dim=4,
                                 conv_alpha=1, block_size=2)
    path = save(network, tmp_path)
    weights = load_file(str(path))
    parsed = parse_lora(weights)
    assert set(parsed.type_counts()) == {"lora"}
    assert {m.rank for m in parsed.modules.values()} == {4}
    assert {m.alpha for m in parsed.modules.values()} == {2.0, 1.0}

    # LyCORIS saves DyLoRA's up factor of a conv layer as a matrix but its loader wants
    # the conv shape: give the loader that view of the same numbers.
    weights = dict(weights)
    for up_key in [key for key in weights if key.endswith("lora_up.weight")]:
        if weights[up_key.replace("lora_up", "lora_down")].dim() == 4:
            weights[up_key] = weights[up_key].reshape(*weights[up_key].shape, 1, 1)
    strength = 0.75
    loaded, _ = create_lycoris_from_weights(strength, None, copy.deepcopy(unet_template),
                                            weights_sd=weights)
    layers = snapshot(loaded)
    loaded.apply_to()
    assert set(layers) == set(parsed.modules)
    for lora_name, adapted in layers.items():
        error, effect = forward_check(adapted, parsed.modules[lora_name], strength)
        assert effect > 1e-3 and error < TOLERANCE, f"{lora_name}: {error:.2e}"
