"""Model hashes against a direct hashlib computation written here."""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sdkit.errors import SdkitError
from sdkit.io import hash_file
from sdkit.io import hashing


def expected_hashes(data: bytes, safetensors_file: bool) -> dict[str, str | None]:
    full = hashlib.sha256(data).hexdigest()
    after_header = None
    if safetensors_file:
        header_size = struct.unpack("<Q", data[:8])[0]
        after_header = hashlib.sha256(data[8 + header_size:]).hexdigest()
    return {"sha256": full, "autov2": full[:10],
            "legacy": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
            "autov3": after_header[:12] if after_header else None, "addnet_full": after_header}


def as_dict(hashes: hashing.Hashes) -> dict[str, str | None]:
    return {"sha256": hashes.sha256, "autov2": hashes.autov2, "legacy": hashes.legacy,
            "autov3": hashes.autov3, "addnet_full": hashes.addnet_full}


@pytest.fixture
def large_safetensors(tmp_path: Path) -> Path:
    generator = torch.Generator().manual_seed(5)
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"a": torch.randn(300_000, generator=generator),
                                 "b": torch.randn(300, 7, generator=generator).half()},
                                path, metadata={"ss_network_dim": "4"})
    return path


@pytest.mark.parametrize("chunk", [hashing.CHUNK_BYTES, 100, 65536 + 8],
                         ids=["default", "header-spans-chunks", "window-spans-chunks"])
def test_safetensors_hashes(large_safetensors: Path, monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(hashing, "CHUNK_BYTES", chunk)
    data = large_safetensors.read_bytes()
    assert len(data) > 0x110000
    progress: list[int] = []
    hashes = hash_file(large_safetensors, progress=progress.append)
    assert as_dict(hashes) == expected_hashes(data, safetensors_file=True)
    assert sum(progress) == len(data)


@pytest.mark.parametrize("size", [0, 1000, 0x100000 + 100, 0x110000 + 5])
def test_legacy_hash_of_short_files(tmp_path: Path, size: int) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    hashes = hash_file(path)
    assert as_dict(hashes) == expected_hashes(path.read_bytes(), safetensors_file=False)


def test_safetensors_with_impossible_header_has_no_autov3(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    hashes = hash_file(path)
    assert hashes.autov3 is None and hashes.addnet_full is None
    assert hashes.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_folders_have_no_file_hashes(tmp_path: Path) -> None:
    assert as_dict(hash_file(tmp_path)) == dict.fromkeys(
        ["sha256", "autov2", "legacy", "autov3", "addnet_full"])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SdkitError, match="no such file or directory"):
        hash_file(tmp_path / "nope.safetensors")


class _ShortReads(io.BytesIO):
    """A stream that returns at most 1000 bytes per read, as pipes and network files may."""

    def readinto(self, buffer) -> int:  # type: ignore[override]
        return super().readinto(memoryview(buffer)[:1000])


def test_short_reads_do_not_reuse_busy_buffers(large_safetensors: Path, monkeypatch) -> None:
    monkeypatch.setattr(hashing, "CHUNK_BYTES", 4096)
    data = large_safetensors.read_bytes()
    hashes = hashing._hash_open_file(_ShortReads(data), len(data), True, None)
    assert as_dict(hashes) == expected_hashes(data, safetensors_file=True)
