"""Reading and writing model files: safetensors, PyTorch checkpoints, diffusers folders,
GGUF (read only).

Nothing here imports torch until a tensor is actually loaded or written, so opening a
file to inspect it stays fast.
"""

from sdkit.io.hashing import Hashes, hash_file
from sdkit.io.lazy import LazyTensor, lazy_tensors
from sdkit.io.model_file import ModelFile, TensorInfo, model_from_tensors
from sdkit.io.opener import open_model
from sdkit.io.writer import write_safetensors

__all__ = [
    "Hashes", "LazyTensor", "ModelFile", "TensorInfo", "hash_file", "lazy_tensors",
    "model_from_tensors", "open_model", "write_safetensors",
]
