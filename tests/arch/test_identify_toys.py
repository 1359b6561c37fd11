"""The committed toy models are identified by structure, in both conventions."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdkit.arch import identify
from sdkit.io import open_model

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy"
pytestmark = pytest.mark.skipif(not (TOY / "sd1" / "toy-sd1.safetensors").is_file(),
                                reason="toy models not built (make fixtures)")


@pytest.mark.parametrize("path, family, convention", [
    ("sd1/toy-sd1.safetensors", "sd1", "ldm"),
    ("sd1/diffusers", "sd1", "diffusers"),
    ("sd1-b/toy-sd1-b.safetensors", "sd1", "ldm"),
    ("sdxl/toy-sdxl.safetensors", "sdxl-base", "ldm"),
    ("sdxl/diffusers", "sdxl-base", "diffusers"),
])
def test_toy_checkpoints(path: str, family: str, convention: str) -> None:
    with open_model(TOY / path) as model:
        identity = identify(model)
    assert identity.kind == "checkpoint"
    assert identity.family == family
    assert identity.key_convention == convention
    assert identity.nonstandard
