"""The output-path rule: an input or an existing file as output needs force, however the
path is spelled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdkit.errors import SdkitError
from sdkit.io.output_path import check_output_path, same_file


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"model")
    return path


def spellings(model: Path) -> list[Path]:
    """Other names of `model`: relative, with `..`, a symlink, a hard link."""
    folder = model.parent
    (folder / "sub").mkdir()
    os.symlink(model, folder / "link.safetensors")
    os.link(model, folder / "hard.safetensors")
    return [Path(os.path.relpath(model)), folder / "sub" / ".." / model.name, folder / "link.safetensors",
            folder / "hard.safetensors"]


def test_an_input_by_any_name_is_refused_without_force(model: Path) -> None:
    for spelling in spellings(model):
        assert same_file(spelling, model)
        with pytest.raises(SdkitError) as refused:
            check_output_path(spelling, [None, model.parent / "other.safetensors", model], force=False)
        assert str(refused.value) == f"{spelling}: is one of the inputs (use --force to replace it)"
        check_output_path(spelling, [model], force=True)
    assert model.read_bytes() == b"model"


def test_a_folder_input_is_refused_too(tmp_path: Path) -> None:
    (tmp_path / "pipeline").mkdir()
    with pytest.raises(SdkitError, match="is one of the inputs"):
        check_output_path(tmp_path / "pipeline" / ".." / "pipeline", [tmp_path / "pipeline"], force=False)


def test_an_existing_output_that_is_no_input_needs_force(model: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"other")
    with pytest.raises(SdkitError) as refused:
        check_output_path(other, [model], force=False)
    assert str(refused.value) == f"{other}: already exists (overwriting needs --force)"
    check_output_path(other, [model], force=True)
    check_output_path(tmp_path / "new.safetensors", [model, None], force=False)


def test_missing_paths_are_never_the_same_file(tmp_path: Path) -> None:
    assert not same_file(tmp_path / "a", tmp_path / "a")
    assert not same_file(tmp_path / "a\0b", tmp_path / "a")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_write_sweeps_the_partials_of_dead_processes_only(tmp_path: Path) -> None:
    import torch

    from sdkit.io import LazyTensor, write_safetensors
    from sdkit.io.output_path import partial_path

    target = tmp_path / "out.safetensors"
    mine = partial_path(target)  # this process: alive
    host = mine.name[len(".out.safetensors."):].split(".")[0].rpartition("-")[0]
    dead_file = tmp_path / f".out.safetensors.{host}-{_dead_pid()}.abcd.partial"
    dead_folder = tmp_path / f".out.safetensors.{host}-{_dead_pid()}.ef01.partial"
    other_host = tmp_path / f".out.safetensors.elsewhere-{_dead_pid()}.2345.partial"
    other_target = tmp_path / f".other.safetensors.{host}-{_dead_pid()}.6789.partial"
    for leftover in (mine, dead_file, other_host, other_target):
        leftover.write_bytes(b"half")
    dead_folder.mkdir()
    (dead_folder / "weights").write_bytes(b"half")
    write_safetensors(target, {"w": LazyTensor("F32", (2,), lambda: torch.ones(2))})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (target, mine, other_host, other_target))
