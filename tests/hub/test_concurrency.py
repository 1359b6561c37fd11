"""Several processes using one library at once: every download indexed, nothing torn."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import kohya_lora
from hub_fakes import Blob, FileHost
from sdkit.errors import SdkitError
from sdkit.hub import TransferOptions, download
from sdkit.hub.library import Library

_DOWNLOAD = """
import sys
from pathlib import Path
from sdkit.hub import download
[outcome] = download(sys.argv[1], library=Path(sys.argv[2]))
print(outcome.path)
"""


def start_download(url: str, library: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen([sys.executable, "-c", _DOWNLOAD, url, str(library)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_parts(folder: Path, count: int, size: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        parts = list(folder.glob("*.part")) if folder.is_dir() else []
        if len(parts) == count and all(p.stat().st_size >= size for p in parts):
            return
        time.sleep(0.05)
    raise AssertionError(f"{count} downloads did not reach {size} bytes in time")


def test_two_processes_download_into_one_library(file_host: FileHost, tmp_path: Path) -> None:
    # safetensors only: the children then never import torch, which keeps this test quick
    style = kohya_lora(tmp_path / "style.safetensors", seed=5).read_bytes()
    detail = kohya_lora(tmp_path / "detail.safetensors", width=1024, seed=6).read_bytes()
    blobs = {"style.safetensors": Blob(style, etag='"a"', stall_at=10_000),
             "detail.safetensors": Blob(detail, etag='"b"', stall_at=2_000)}
    file_host.blobs.update(blobs)
    library = tmp_path / "webui"
    Library.init(library, "a1111").close()

    children = [start_download(file_host.url(name), library) for name in blobs]
    wait_for_parts(library / ".sdkit" / "downloads", 2, 2_000)  # both are mid-file now
    for blob in blobs.values():
        blob.resume.set()
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err

    with Library.open(library) as lib:
        entries = {e.path: e.kind for e in lib.index.entries()}
    assert entries == {"models/Lora/style.safetensors": "lora", "models/Lora/detail.safetensors": "lora"}
    assert (library / "models/Lora/style.safetensors").read_bytes() == style
    assert (library / "models/Lora/detail.safetensors").read_bytes() == detail
    check = sqlite3.connect(library / ".sdkit" / "index.sqlite").execute("PRAGMA integrity_check")
    assert check.fetchone() == ("ok",)


def test_same_download_twice_at_once_is_refused(file_host: FileHost, tmp_path: Path,
                                                options: TransferOptions) -> None:
    blob = Blob(b"z" * 50_000, etag='"z"', stall_at=20_000)
    file_host.blobs["big.safetensors"] = blob
    Library.init(tmp_path / "lib", "comfyui").close()
    first = start_download(file_host.url("big.safetensors"), tmp_path / "lib")
    try:
        wait_for_parts(tmp_path / "lib" / ".sdkit" / "downloads", 1, 20_000)
        with pytest.raises(SdkitError, match="another process is downloading this file"):
            download(file_host.url("big.safetensors"), library=tmp_path / "lib", options=options)
    finally:
        blob.resume.set()
        first.communicate(timeout=60)
    assert first.returncode == 0
