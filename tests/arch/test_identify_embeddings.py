"""identify() on textual-inversion embeddings and A1111 hypernetworks, saved the way their
trainers save them (torch.save of A1111's dicts, safetensors for kohya and diffusers)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdkit.arch import identify
from sdkit.io import open_model
from sdkit.io.model_file import model_from_tensors


def _a1111_embedding(path, vectors: int, width: int):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(vectors, width)},
                "name": "shapestyle", "step": 500, "sd_checkpoint": "0123abcd",
                "sd_checkpoint_name": "v1-5-pruned"}, path)
    return path


@pytest.mark.parametrize("width, family", [(768, "sd1"), (1024, "sd2")])
def test_a1111_embedding(tmp_path, width, family):
    with open_model(_a1111_embedding(tmp_path / "shapestyle.pt", 3, width)) as model:
        identity = identify(model)
    assert (identity.kind, identity.family, identity.key_convention) == ("embedding", family, "a1111")
    assert identity.facts["vectors"] == 3 and identity.facts["token"] == "shapestyle"
    assert identity.components == ["text_encoder"] and not identity.nonstandard
    assert identity.notes[0] == \
        f"3 vectors of width {width}, token 'shapestyle', trained 500 steps, on v1-5-pruned"


def test_kohya_embeddings(tmp_path):
    save_file({"emb_params": torch.randn(2, 1024)}, tmp_path / "sd2.safetensors")
    save_file({"clip_l": torch.randn(4, 768), "clip_g": torch.randn(4, 1280)}, tmp_path / "xl.safetensors")
    with open_model(tmp_path / "sd2.safetensors") as model:
        identity = identify(model)
    assert (identity.family, identity.key_convention, identity.facts["vectors"]) == ("sd2", "kohya", 2)
    with open_model(tmp_path / "xl.safetensors") as model:
        identity = identify(model)
    assert (identity.kind, identity.family, identity.nonstandard) == ("embedding", "sdxl-base", False)
    assert identity.components == ["text_encoder", "text_encoder_2"]
    assert identity.facts["widths"] == {"text_encoder": 768, "text_encoder_2": 1280}


def test_diffusers_learned_embeds(tmp_path):
    save_file({"<cat-toy>": torch.randn(768)}, tmp_path / "learned_embeds.safetensors")
    with open_model(tmp_path / "learned_embeds.safetensors") as model:
        identity = identify(model)
    assert (identity.kind, identity.family, identity.key_convention) == ("embedding", "sd1", "diffusers")
    assert identity.facts["token"] == "<cat-toy>" and identity.facts["vectors"] == 1


def test_tiny_embeddings_are_nonstandard():
    identity = identify(model_from_tensors({"emb_params": torch.randn(2, 32)}))
    assert (identity.family, identity.nonstandard) == ("unknown", True)
    sdxl = identify(model_from_tensors({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 48)}))
    assert (sdxl.family, sdxl.nonstandard) == ("sdxl-base", True)  # by structure: two encoders


def test_embedding_family_from_modelspec():
    model = model_from_tensors({"emb_params": torch.randn(1, 32)}, metadata={
        "modelspec.architecture": "stable-diffusion-v1/textual-inversion",
        "modelspec.is_negative_embedding": "true"})
    identity = identify(model)
    assert identity.family == "sd1" and identity.nonstandard and "negative embedding" in identity.notes


def _hypernetwork(path, widths: list[int], structure=(1, 2, 1)):
    """A1111's `Hypernetwork.save` layout: per width a (k, v) pair of Sequential state dicts."""
    def module(width: int) -> dict[str, torch.Tensor]:
        layers = []
        for i in range(len(structure) - 1):
            layers += [torch.nn.Linear(width * structure[i], width * structure[i + 1]), torch.nn.ReLU()]
        sequential = torch.nn.Sequential(*layers[:-1])
        return {"linear." + k: v for k, v in sequential.state_dict().items()}

    state = {width: (module(width), module(width)) for width in widths}
    state.update({"layer_structure": list(structure), "activation_func": "relu", "is_layer_norm": False,
                  "weight_initialization": "Normal", "use_dropout": False, "name": "hn", "step": 1200,
                  "sd_checkpoint_name": "v1-5-pruned"})
    torch.save(state, path)
    return path


@pytest.mark.parametrize("widths, family", [([768, 320, 640, 1280], "sd1"), ([1024, 320, 640, 1280], "sd2")])
def test_a1111_hypernetwork(tmp_path, widths, family):
    with open_model(_hypernetwork(tmp_path / "hn.pt", widths)) as model:
        identity = identify(model)
    assert (identity.kind, identity.family, identity.key_convention) == ("hypernetwork", family, "a1111")
    assert identity.facts["sizes"] == sorted(widths)
    assert identity.facts["layer_structure"] == [1, 2, 1] and identity.facts["activation_func"] == "relu"
    assert identity.components == ["unet"] and not identity.nonstandard
    assert identity.notes[0].startswith("hypernetwork 'hn' for widths")


def test_tiny_hypernetwork(tmp_path):
    with open_model(_hypernetwork(tmp_path / "tiny.pt", [32], structure=(1, 3, 1))) as model:
        identity = identify(model)
    assert (identity.kind, identity.family, identity.nonstandard) == ("hypernetwork", "unknown", True)
    assert identity.facts["layer_structure"] == [1, 3, 1]
