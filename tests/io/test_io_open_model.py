"""open_model dispatch: suffixes, missing paths, unknown files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sdkit.errors import SdkitError
from sdkit.io import open_model


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.safetensors"
    with pytest.raises(SdkitError, match=f"^{re.escape(str(missing))}: no such file or directory$"):
        open_model(missing)


@pytest.mark.parametrize("name", ["model.onnx", "model", "notes.txt"])
def test_unrecognised_files(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\0" * 64)
    with pytest.raises(SdkitError, match="unrecognised model file"):
        open_model(path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".CKPT"])
def test_pickle_suffixes(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.ones(2)}, path)
    with open_model(str(path)) as model:
        assert model.format == "pickle" and model.keys() == ["w"]


def test_safetensors_named_as_pickle_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    safetensors.torch.save_file({"w": torch.ones(2)}, path)
    with pytest.raises(SdkitError, match="looks like safetensors"):
        open_model(path)
