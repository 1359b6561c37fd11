"""The hash cache: a file hashed before and unchanged since is not read again.

Expected digests come from hashlib over the file's bytes. That a cached answer was given
without reading the file is shown by making the file unreadable to sdkit's hashing code
after caching: `open` is replaced in the two modules that read files to hash them (chmod
would not stop root), so an uncached hash of such a file fails.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from sdkit.errors import SdkitError
from sdkit.io import hash_cache, hash_file, hashing
from sdkit.ops import recipe_meta
from sdkit.ops.merge import MergeRecipe, RecipeInput, merge_models
from sdkit.ops.recipe_meta import file_sha256

LEGACY_WINDOW = slice(0x100000, 0x110000)
PROCESS_FILES = 12


def expected_hashes(data: bytes, safetensors_file: bool) -> dict[str, str | None]:
    full = hashlib.sha256(data).hexdigest()
    addnet = None
    if safetensors_file:
        addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    return {"sha256": full, "autov2": full[:10], "legacy": hashlib.sha256(data[LEGACY_WINDOW]).hexdigest()[:8],
            "autov3": addnet[:12] if addnet else None, "addnet_full": addnet}


def expected_of(path: Path) -> dict[str, str | None]:
    return expected_hashes(path.read_bytes(), path.suffix == ".safetensors")


def tiny_vae(path: Path, seed: int) -> Path:
    """A VAE a merge accepts (diffusers layout, width 8)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    save_file({key: value.contiguous().numpy() for key, value in vae.state_dict().items()}, str(path))
    return path


def wait_until_settled(paths: list[Path]) -> None:
    """Sleep until every file's last write lies outside the cache's racy window."""
    newest = max(max(path.stat().st_mtime_ns, path.stat().st_ctime_ns) for path in paths)
    remaining = newest + hash_cache.RACY_WINDOW_NS + 50_000_000 - time.time_ns()
    if remaining > 0:
        time.sleep(remaining / 1e9)


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files written once, more than the racy window before any test hashes them; tests
    that change a file have one of their own."""
    folder = tmp_path_factory.mktemp("settled")
    generator = random.Random(7)
    files: dict[str, Path] = {}
    for name in ("model", "same-size", "append", "rename-over", "during", "full-and-sha", "unusable"):
        files[name] = folder / f"{name}.safetensors"
        save_file({"weights": np.frombuffer(generator.randbytes(0x120000), dtype=np.uint8)}, str(files[name]))
    for name in ("ckpt", "sha-only"):
        files[name] = folder / f"{name}.ckpt"
        files[name].write_bytes(generator.randbytes(0x110000 + 77))
    for index in range(PROCESS_FILES):
        files[f"process-{index}"] = folder / f"process-{index}.bin"
        files[f"process-{index}"].write_bytes(generator.randbytes(4096 + index))
    files["vae-a"] = tiny_vae(folder / "vae-a.safetensors", 1)
    files["vae-b"] = tiny_vae(folder / "vae-b.safetensors", 2)
    wait_until_settled(list(files.values()))
    return files


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of the test's own, enabled."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SDKIT_CACHE_DIR", str(folder))
    monkeypatch.delenv("SDKIT_HASH_CACHE", raising=False)
    return folder


@pytest.fixture
def block_reads(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """block_reads(*paths): from now on, sdkit's hashing code cannot open these files."""
    blocked: set[str] = set()

    def guarded_open(file: object, *args: object, **kwargs: object) -> object:
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) in blocked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return builtins.open(file, *args, **kwargs)  # type: ignore[call-overload]

    for module in (hashing, recipe_meta):
        monkeypatch.setattr(module, "open", guarded_open, raising=False)
    return lambda *paths: blocked.update(os.path.realpath(path) for path in paths)


def cached_paths(cache_dir: Path) -> set[str]:
    """The files the cache database holds a row for."""
    database = cache_dir / hash_cache.CACHE_FILE_NAME
    if not database.exists():
        return set()
    with closing(sqlite3.connect(database)) as connection:
        return {row[0] for row in connection.execute("SELECT path FROM files")}


def test_a_hit_answers_without_reading_the_file(settled: dict[str, Path], block_reads) -> None:
    model, ckpt = settled["model"], settled["ckpt"]
    expected = expected_of(model)
    assert asdict(hash_file(model)) == expected
    block_reads(model, ckpt)
    with pytest.raises(SdkitError, match="cannot read"):  # the block works on an uncached file
        hash_file(ckpt)
    progress: list[int] = []
    assert asdict(hash_file(model, progress=progress.append)) == expected
    assert progress == [model.stat().st_size]
    assert file_sha256(model) == expected["sha256"]  # a full row answers a sha256 alone too


def test_a_sha256_row_answers_file_sha256_but_not_the_full_set(settled: dict[str, Path], block_reads) -> None:
    path = settled["sha-only"]
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    block_reads(path)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(SdkitError, match="cannot read"):  # the other digests were never computed
        hash_file(path)


def test_a_sha256_stored_later_keeps_the_full_set(settled: dict[str, Path], block_reads) -> None:
    path = settled["full-and-sha"]
    full_hashed: list[bool] = []

    def hash_all_meanwhile(count: int) -> None:  # another hash of the same file ends first
        if not full_hashed:
            full_hashed.append(True)
            hash_file(path)

    assert file_sha256(path, hash_all_meanwhile) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert full_hashed
    block_reads(path)
    assert asdict(hash_file(path)) == expected_of(path)


def _rewrite_same_size(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))


def _append(path: Path) -> None:
    with open(path, "ab") as file:
        file.write(b"more")


def _rename_over(path: Path) -> None:
    other = path.with_name("replacement.tmp")
    data = path.read_bytes()
    other.write_bytes(data[:-1] + bytes([data[-1] ^ 0x0F]))
    os.replace(other, path)


@pytest.mark.parametrize("name,change", [("same-size", _rewrite_same_size), ("append", _append),
                                         ("rename-over", _rename_over)])
def test_a_changed_file_is_hashed_again(settled: dict[str, Path], name: str,
                                        change: Callable[[Path], None]) -> None:
    path = settled[name]
    hash_file(path)
    before = path.stat()
    change(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `touch -d` or `rsync -t` would
    after = path.stat()
    assert after.st_mtime_ns == before.st_mtime_ns and after.st_ctime_ns != before.st_ctime_ns
    assert asdict(hash_file(path)) == expected_of(path)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_written_just_now_is_not_stored(tmp_path: Path, cache_dir: Path, block_reads) -> None:
    path = tmp_path / "fresh.ckpt"
    path.write_bytes(b"just written" * 1000)
    assert asdict(hash_file(path)) == expected_of(path)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert cached_paths(cache_dir) == set()
    block_reads(path)
    with pytest.raises(SdkitError, match="cannot read"):
        hash_file(path)


def test_a_file_written_while_hashed_is_not_stored(settled: dict[str, Path], cache_dir: Path) -> None:
    path = settled["during"]
    writes: list[int] = []

    def write_meanwhile(count: int) -> None:
        if not writes:
            writes.append(count)
            _append(path)

    hash_file(path, progress=write_meanwhile)
    assert writes
    assert str(path.resolve()) not in cached_paths(cache_dir)
    assert asdict(hash_file(path)) == expected_of(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_only_regular_files_have_a_cacheable_state(tmp_path: Path, settled: dict[str, Path]) -> None:
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)  # its bytes can differ at every read whatever its stat says
    assert hash_cache.FileState.of(str(pipe)) is None
    assert hash_cache.FileState.of(str(tmp_path)) is None
    assert hash_cache.FileState.of(str(settled["model"])) is not None


def _corrupt(cache_dir: Path) -> None:
    cache_dir.mkdir()
    (cache_dir / hash_cache.CACHE_FILE_NAME).write_bytes(b"not a database " * 300)


def _parent_is_a_file(cache_dir: Path) -> None:
    cache_dir.write_bytes(b"")  # a read-only or missing home gives the same kind of error


def _database_is_a_folder(cache_dir: Path) -> None:
    (cache_dir / hash_cache.CACHE_FILE_NAME).mkdir(parents=True)


@pytest.mark.parametrize("spoil", [_corrupt, _parent_is_a_file, _database_is_a_folder])
def test_an_unusable_cache_never_fails_hashing(settled: dict[str, Path], cache_dir: Path,
                                               spoil: Callable[[Path], None]) -> None:
    spoil(cache_dir)
    path = settled["unusable"]
    assert asdict(hash_file(path)) == expected_of(path)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_corrupt_database_is_replaced(settled: dict[str, Path], cache_dir: Path, block_reads) -> None:
    _corrupt(cache_dir)
    path = settled["model"]
    hash_file(path)
    assert cached_paths(cache_dir) == {str(path.resolve())}
    block_reads(path)
    assert asdict(hash_file(path)) == expected_of(path)


def test_a_locked_database_is_waited_for_briefly_then_skipped(
        settled: dict[str, Path], cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hash_file(settled["ckpt"])  # creates the database
    monkeypatch.setattr(hash_cache, "BUSY_TIMEOUT_S", 0.05)
    with closing(sqlite3.connect(cache_dir / hash_cache.CACHE_FILE_NAME, isolation_level=None)) as holder:
        holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
        path = settled["model"]
        assert asdict(hash_file(path)) == expected_of(path)
        assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
        holder.execute("ROLLBACK")
    assert cached_paths(cache_dir) == {str(settled["ckpt"].resolve())}


_HASHING_PROCESS = """
import os, sys, time
from pathlib import Path
from sdkit.io import hash_file
from sdkit.ops.recipe_meta import file_sha256
ready, go, *files = sys.argv[1:]
Path(ready).touch()
while not os.path.exists(go):
    time.sleep(0.005)
for file in files:
    print(file, hash_file(file).sha256, file_sha256(file))
"""


def test_two_processes_hashing_at_once_both_succeed(settled: dict[str, Path], tmp_path: Path,
                                                    cache_dir: Path, block_reads) -> None:
    files = [settled[f"process-{index}"] for index in range(PROCESS_FILES)]
    go = tmp_path / "go"
    ready = [tmp_path / "ready-1", tmp_path / "ready-2"]
    processes = [subprocess.Popen([sys.executable, "-c", _HASHING_PROCESS, str(flag), str(go), *map(str, order)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for flag, order in zip(ready, (files, files[::-1]))]
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both start hashing together
    expected = {str(file): hashlib.sha256(file.read_bytes()).hexdigest() for file in files}
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        printed = {path: (full, alone) for path, full, alone in (line.split() for line in out.splitlines())}
        assert printed == {path: (digest, digest) for path, digest in expected.items()}
    assert cached_paths(cache_dir) == {str(file.resolve()) for file in files}
    block_reads(*files)
    assert {str(file): hash_file(file).sha256 for file in files} == expected


def test_off_turns_the_cache_off(settled: dict[str, Path], cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                 block_reads) -> None:
    monkeypatch.setenv("SDKIT_HASH_CACHE", "off")
    path = settled["model"]
    assert asdict(hash_file(path)) == expected_of(path)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not cache_dir.exists()
    block_reads(path)
    with pytest.raises(SdkitError, match="cannot read"):
        hash_file(path)


def test_where_the_cache_lives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hash_cache.database_path() == tmp_path / "cache" / "hashes.sqlite"  # SDKIT_CACHE_DIR
    monkeypatch.delenv("SDKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hash_cache.database_path() == tmp_path / "xdg" / "sdkit" / "hashes.sqlite"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hash_cache.database_path() == tmp_path / "home" / ".cache" / "sdkit" / "hashes.sqlite"


def _recorded_inputs(path: Path) -> list[str]:
    with safe_open(str(path), "np") as file:
        return [item["sha256"] for item in json.loads(file.metadata()["sdkit.recipe"])["inputs"]]


def test_a_merge_records_the_same_input_sha256_with_a_warm_cache(
        settled: dict[str, Path], tmp_path: Path, cache_dir: Path, block_reads) -> None:
    inputs = [settled["vae-a"], settled["vae-b"]]
    expected = [hashlib.sha256(path.read_bytes()).hexdigest() for path in inputs]

    def merge(name: str) -> list[str]:
        recipe = MergeRecipe([RecipeInput(str(path)) for path in inputs], "weighted_sum", params={"alpha": 0.5})
        return _recorded_inputs(merge_models(recipe, tmp_path / name).path)

    assert merge("cold.safetensors") == expected
    assert cached_paths(cache_dir) == {str(path.resolve()) for path in inputs}
    block_reads(*inputs)  # the merge still reads tensors; only hashing them again is refused
    assert merge("warm.safetensors") == expected
