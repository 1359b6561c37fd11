"""Benchmark fixtures: full-size synthetic model files, built once and cached.

The cache folder is `$SDKIT_BENCH_DIR`, or `sdkit-bench` in the system temp folder; files
there are reused across runs (delete the folder to rebuild them).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from sdkit.errors import SdkitError
from sdkit.io import LazyTensor, open_model, write_safetensors


@pytest.fixture(scope="session")
def bench_cache() -> Path:
    folder = Path(os.environ.get("SDKIT_BENCH_DIR", Path(tempfile.gettempdir()) / "sdkit-bench"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sd15_unet_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the real SD1.5 UNet (diffusers layout), without allocating it."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)  # SD1.x: the defaults but the context width
    return {name: tuple(tensor.shape) for name, tensor in unet.state_dict().items()}


def _random_tensor(shape: tuple[int, ...], dtype: torch.dtype,
                   seed: int) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=generator).to(dtype)
    return load


def cached_synthetic(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "F16", seed: int = 0) -> Path:
    """A safetensors file of random tensors with these shapes, reused when already built
    (files of different `seed`s hold different values)."""
    try:
        with open_model(path) as model:
            if {name: info.shape for name, info in model.infos.items()} == shapes:
                return path
    except SdkitError:
        pass
    torch_dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                   "F8_E4M3": torch.float8_e4m3fn}[dtype]
    tensors = {name: LazyTensor(dtype, shape, _random_tensor(shape, torch_dtype, seed + index))
               for index, (name, shape) in enumerate(sorted(shapes.items()))}
    started = time.perf_counter()
    write_safetensors(path, tensors, {"format": "pt"}, overwrite=True)
    print(f"\nbuilt {path} ({path.stat().st_size / 2**30:.2f} GiB) in "
          f"{time.perf_counter() - started:.1f} s")
    return path


@pytest.fixture(scope="session")
def sd15_unet_file(bench_cache: Path) -> Path:
    """~1.7 GB fp16 safetensors with SD1.5 UNet shapes and random weights."""
    return cached_synthetic(bench_cache / "sd15-unet-fp16.safetensors", sd15_unet_shapes())


def _best_of(runs: int, action: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


@pytest.fixture(scope="session")
def best_of() -> Callable[[int, Callable[[], object]], float]:
    """best_of(runs, action) -> fastest wall time in seconds (the least disturbed by other
    load on the machine)."""
    return _best_of
