"""A full-size checkpoint that costs nothing to make: a real header over a sparse data region.

What `sdkit inspect` reads of a safetensors file is its header (and the few bytes of the
CLIP position ids); a file whose data region is a hole of the right size is, to it, a real
checkpoint. The tensor names are those of the toy SD1 model (LDM single-file layout) plus
the EMA copies of its UNet, as full training checkpoints carry them; widths are scaled up
tenfold, so the data region is hundreds of MiB like a real model's.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

TOY_SD1 = Path(__file__).resolve().parents[1] / "fixtures" / "toy" / "sd1" / "toy-sd1.safetensors"
_SCALE = 10
_UNSCALED = {1, 3, 4, 77}  # channel counts of latents and images, kernel sizes, token count


def _toy_shapes() -> dict[str, tuple[str, list[int]]]:
    with open(TOY_SD1, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return {name: (entry["dtype"], entry["shape"]) for name, entry in header.items()}


def _full_size_shapes() -> dict[str, tuple[str, list[int]]]:
    shapes = {}
    for name, (dtype, shape) in _toy_shapes().items():
        if dtype == "I64":  # the position ids keep their size and type
            shapes[name] = (dtype, shape)
            continue
        shapes[name] = ("BF16", [dim if dim in _UNSCALED else dim * _SCALE for dim in shape])
    for name, entry in list(shapes.items()):
        if name.startswith("model.diffusion_model."):  # EMA: `model_ema.` + the dotless path
            shapes["model_ema." + name[len("model."):].replace(".", "")] = entry
    return shapes


def write_header_only_checkpoint(path: Path) -> Path:
    """Write the header at `path`, the position ids' true values, and a hole for the rest."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    ids_at = None
    for name, (dtype, shape) in _full_size_shapes().items():
        size = (8 if dtype == "I64" else 2) * _count(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        if name.endswith("position_ids"):
            ids_at = (offset, _count(shape))
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        if ids_at is not None:
            file.seek(8 + len(encoded) + ids_at[0])
            file.write(struct.pack(f"<{ids_at[1]}q", *range(ids_at[1])))
    os.truncate(path, 8 + len(encoded) + offset)
    return path


def _count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
