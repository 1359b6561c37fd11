"""Installing finished outputs: renameat2 and its fallbacks, the refusal of a target that
appeared while the output was written, and what the sweeper does with set-aside ones.

Every install test runs in each way the system may offer: renameat2 (where this file
system has it), without renameat2 (hard links for files, an mkdir claim for folders,
the old folder set aside for a replacement), and for files also without hard links.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from sdkit.io import rename
from sdkit.io.output_path import (OutputExists, build_in_partial, install_file, install_folder, partial_path,
                                  sweep_dead_partials, write_file_atomically)

FILE_MODES = ("renameat2", "hard link", "check and rename")
FOLDER_MODES = ("renameat2", "without renameat2")


def _exchange_works(folder: Path) -> bool:
    (folder / "x").mkdir()
    (folder / "y").mkdir()
    try:
        return rename.rename_exchange(folder / "x", folder / "y")
    finally:
        (folder / "x").rmdir()
        (folder / "y").rmdir()


@pytest.fixture
def mode_setter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[str], None]:
    """set(mode): make the system offer only what `mode` names."""
    def set_mode(mode: str) -> None:
        if mode == "renameat2":
            if not _exchange_works(tmp_path):
                pytest.skip("no renameat2 on this file system")
            return
        monkeypatch.setattr(rename, "_libc_renameat2", lambda: None)
        if mode == "check and rename":
            def no_links(*args: object, **kwargs: object) -> None:
                raise OSError(errno.EPERM, "Operation not permitted")
            monkeypatch.setattr(os, "link", no_links)
    return set_mode


def existing(kind: str, path: Path) -> Callable[[], object]:
    """Make `path` an existing file, empty folder, folder or dangling link; returns a
    function that tells whether it is still exactly that."""
    if kind == "file":
        path.write_bytes(b"theirs")
        return lambda: path.read_bytes()
    if kind == "empty folder":
        path.mkdir()
        return lambda: (path.is_dir(), sorted(os.listdir(path)))
    if kind == "folder":
        path.mkdir()
        (path / "weights").write_bytes(b"theirs")
        return lambda: (path / "weights").read_bytes()
    os.symlink(path.parent / "nowhere", path)
    return lambda: os.readlink(path)


TARGET_KINDS = ("file", "empty folder", "folder", "dangling link")


@pytest.mark.parametrize("mode", FILE_MODES)
@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_a_file_never_replaces_what_is_there_without_replace(mode_setter: Callable[[str], None], tmp_path: Path,
                                                             mode: str, kind: str) -> None:
    mode_setter(mode)
    target = tmp_path / "out.safetensors"
    state = existing(kind, target)
    before = state()
    partial = partial_path(target)
    partial.write_bytes(b"ours")
    with pytest.raises(OutputExists, match="already exists"):
        install_file(partial, target, replace=False)
    assert state() == before and partial.read_bytes() == b"ours"


@pytest.mark.parametrize("mode", FILE_MODES)
def test_a_file_is_installed_and_replaced(mode_setter: Callable[[str], None], tmp_path: Path, mode: str) -> None:
    mode_setter(mode)
    target = tmp_path / "out.safetensors"
    for replace, content in ((False, b"first"), (True, b"second")):
        partial = partial_path(target)
        partial.write_bytes(content)
        install_file(partial, target, replace=replace)
        assert target.read_bytes() == content
        assert os.listdir(tmp_path) == [target.name]


def built_folder(target: Path, content: bytes = b"ours") -> Path:
    built = partial_path(target)
    built.mkdir()
    (built / "weights").write_bytes(content)
    return built


@pytest.mark.parametrize("mode", FOLDER_MODES)
@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_a_folder_never_replaces_what_is_there_without_replace(mode_setter: Callable[[str], None], tmp_path: Path,
                                                               mode: str, kind: str) -> None:
    mode_setter(mode)
    target = tmp_path / "out"
    state = existing(kind, target)
    before = state()
    built = built_folder(target)
    with pytest.raises(OutputExists, match="already exists"):
        install_folder(built, target, replace=False)
    assert state() == before and (built / "weights").read_bytes() == b"ours"


@pytest.mark.parametrize("mode", FOLDER_MODES)
@pytest.mark.parametrize("kind", TARGET_KINDS + ("nothing",))
def test_a_folder_replaces_whatever_is_there_with_replace(mode_setter: Callable[[str], None], tmp_path: Path,
                                                          mode: str, kind: str) -> None:
    mode_setter(mode)
    target = tmp_path / "out"
    if kind != "nothing":
        existing(kind, target)
    install_folder(built_folder(target), target, replace=True)
    assert (target / "weights").read_bytes() == b"ours"
    assert os.listdir(tmp_path) == ["out"]  # the old one removed, nothing set aside left


def test_a_failed_replacement_without_renameat2_puts_the_old_folder_back(
        mode_setter: Callable[[str], None], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mode_setter("without renameat2")
    target = tmp_path / "out"
    state = existing("folder", target)
    built = built_folder(target)
    real_rename = os.rename

    def failing(source: object, destination: object) -> None:
        if Path(source) == built:
            raise OSError(errno.EIO, "Input/output error")
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        install_folder(built, target, replace=True)
    assert state() == b"theirs"
    assert sorted(os.listdir(tmp_path)) == sorted([built.name, "out"])


# --------------------------------------------------------------------------- renameat2 itself


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP])
def test_renameat2_missing_from_kernel_or_file_system_is_reported_not_raised(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, code: int) -> None:
    def refusing(*args: object) -> int:
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(rename, "_libc_renameat2", lambda: refusing)
    (tmp_path / "a").write_bytes(b"a")
    assert rename.rename_noreplace(tmp_path / "a", tmp_path / "b") is False
    assert rename.rename_exchange(tmp_path / "a", tmp_path / "b") is False
    assert os.listdir(tmp_path) == ["a"]


def test_renameat2_errors_are_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refusing(*args: object) -> int:
        ctypes.set_errno(errno.EACCES)
        return -1

    monkeypatch.setattr(rename, "_libc_renameat2", lambda: refusing)
    with pytest.raises(PermissionError):
        rename.rename_noreplace(tmp_path / "a", tmp_path / "b")


def test_renameat2_refuses_and_swaps_where_available(tmp_path: Path) -> None:
    if not _exchange_works(tmp_path):
        pytest.skip("no renameat2 on this file system")
    (tmp_path / "file").write_bytes(b"file")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileExistsError):
        rename.rename_noreplace(tmp_path / "file", tmp_path / "folder")
    assert rename.rename_exchange(tmp_path / "file", tmp_path / "folder")
    assert (tmp_path / "file").is_dir() and (tmp_path / "folder").read_bytes() == b"file"


# --------------------------------------------------------------------------- writers


@pytest.mark.parametrize("mode", FILE_MODES)
def test_a_file_that_appears_while_writing_is_kept(mode_setter: Callable[[str], None], tmp_path: Path,
                                                   mode: str) -> None:
    import torch

    from sdkit.io import LazyTensor, write_safetensors

    mode_setter(mode)
    target = tmp_path / "out.safetensors"

    def another_writer_finishes_first(_partial: Path) -> None:
        target.write_bytes(b"theirs")

    tensors = {"w": LazyTensor("F32", (2,), lambda: torch.ones(2))}
    with pytest.raises(OutputExists):
        write_safetensors(target, tensors, finish=another_writer_finishes_first)
    with pytest.raises(OutputExists):
        write_file_atomically(target.with_suffix(".png"), lambda partial: (
            partial.write_bytes(b"ours"), target.with_suffix(".png").write_bytes(b"theirs")), overwrite=False)
    assert target.read_bytes() == target.with_suffix(".png").read_bytes() == b"theirs"
    assert sorted(os.listdir(tmp_path)) == ["out.png", "out.safetensors"]  # no partial left


@pytest.mark.parametrize("mode", FOLDER_MODES)
def test_a_folder_that_appears_while_building_is_kept(mode_setter: Callable[[str], None], tmp_path: Path,
                                                      mode: str) -> None:
    mode_setter(mode)
    target = tmp_path / "out"

    def fill(folder: Path) -> None:
        (folder / "weights").write_bytes(b"ours")
        target.mkdir()  # another writer's, still empty

    with pytest.raises(OutputExists):
        build_in_partial(target, False, fill)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == []


# --------------------------------------------------------------------------- the sweeper


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def leftover(target: Path, pid: int, kind: str) -> Path:
    """A hidden path of `target` as process `pid` of this host names them."""
    mine = partial_path(target).name  # .<name>.<host>-<our pid>.<random>.partial
    host = mine[len(f".{target.name}."):].split(".")[0].rpartition("-")[0]
    path = target.parent / f".{target.name}.{host}-{pid}.{os.urandom(4).hex()}.{kind}"
    path.mkdir()
    (path / "weights").write_bytes(kind.encode())
    return path


def test_a_set_aside_output_is_put_back_when_nothing_took_its_place(tmp_path: Path) -> None:
    target = tmp_path / "out"
    previous = leftover(target, _dead_pid(), "previous")
    half_built = leftover(target, _dead_pid(), "partial")
    running = leftover(target, os.getpid(), "previous")
    sweep_dead_partials(target)
    assert (target / "weights").read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == sorted(["out", running.name])
    assert not previous.exists() and not half_built.exists()


def test_a_set_aside_output_is_removed_once_the_new_one_is_in_place(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "weights").write_bytes(b"new")
    leftover(target, _dead_pid(), "previous")
    sweep_dead_partials(target)
    assert os.listdir(tmp_path) == ["out"] and (target / "weights").read_bytes() == b"new"
