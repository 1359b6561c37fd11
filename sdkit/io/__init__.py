"""Reading and writing model files: safetensors, PyTorch checkpoints, diffusers folders,
GGUF (read only).

Nothing here imports torch until a tensor is actually loaded or written, so opening a
file to inspect it stays fast. The names below are imported from their modules on first
use: `sdkit.io.model_file` and the header readers load without the writer, the hashing
and the unpickler behind them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdkit.io.hashing import Hashes, hash_file
    from sdkit.io.lazy import LazyTensor, lazy_tensors
    from sdkit.io.model_file import ModelFile, TensorInfo, model_from_tensors
    from sdkit.io.opener import open_model
    from sdkit.io.writer import write_safetensors

_MODULES = {
    "Hashes": "hashing", "hash_file": "hashing",
    "LazyTensor": "lazy", "lazy_tensors": "lazy",
    "ModelFile": "model_file", "TensorInfo": "model_file", "model_from_tensors": "model_file",
    "open_model": "opener",
    "write_safetensors": "writer",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULES})
