"""Fixtures shared by the io tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable

import pytest


def _raw_safetensors(header: dict[str, Any] | bytes, data: bytes = b"",
                     header_size: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    size = len(raw) if header_size is None else header_size
    return struct.pack("<Q", size) + raw + data


@pytest.fixture
def raw_safetensors() -> Callable[..., bytes]:
    """raw_safetensors(header dict or bytes, data=b"", header_size=None) -> file bytes,
    built by hand (not by the code under test)."""
    return _raw_safetensors


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, bytes], Path]:
    """write_file(name, content) -> path of a new file under tmp_path."""

    def write(name: str, content: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(content)
        return path

    return write
