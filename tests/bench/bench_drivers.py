"""The programs the benchmark report times besides `python -m sdkit`, each run as its own
process: `python tests/bench/bench_drivers.py NAME OUTPUT INPUT...`.

- baseline: read every input in 16 MiB chunks and write as many bytes as the operation's
  output to a new file, fsynced: the plain I/O an operation cannot avoid.
  baseline-direct: the same with O_DIRECT writes (no page cache), as sdkit writes.
- full-load references, the way the WebUI merger and kohya's scripts work: `load_file`
  everything, compute in float32, `save_file`.
- peers: sd-mecha merges and diffusers' LoRA fuse.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CHUNK = 16 << 20


def baseline(output: str, size: str, *inputs: str, direct: bool = False) -> None:
    """Read the inputs side by side and write `size` bytes (from what was read), fsynced;
    `direct`: the writes bypass the page cache (O_DIRECT, whole 4 KiB blocks, as sdkit's
    writer does where it can), the file cut to `size` at the end."""
    import mmap

    remaining = int(size)
    buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    sources = [open(path, "rb", buffering=0) for path in inputs]
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    with open(os.open(output, flags, 0o644), "wb", buffering=0) as target:
        while sources or remaining:
            for source in list(sources):
                if not source.readinto(buffer):
                    source.close()
                    sources.remove(source)
            count = min(remaining, CHUNK)
            target.write(memoryview(buffer)[:count + (-count % 4096 if direct else 0)])
            remaining -= count
        target.truncate(int(size))
        os.fsync(target.fileno())


def full_load_weighted_sum(output: str, a: str, b: str) -> None:
    from safetensors.torch import load_file, save_file

    first, second = load_file(a), load_file(b)
    save_file({key: first[key].float().lerp(second[key].float(), 0.5).to(first[key].dtype)
               if first[key].is_floating_point() else first[key] for key in first}, output)


def full_load_add_difference(output: str, a: str, b: str, c: str) -> None:
    from safetensors.torch import load_file, save_file

    first, second, third = load_file(a), load_file(b), load_file(c)
    save_file({key: (first[key].float() + second[key].float() - third[key].float()).to(first[key].dtype)
               if first[key].is_floating_point() else first[key] for key in first}, output)


def full_load_bake(output: str, base: str, lora: str, lora_map: str) -> None:
    """kohya's merge_lora_to_models in ten lines: W += alpha / rank · up @ down, in place."""
    from safetensors.torch import load_file, save_file

    model, adapter = load_file(base), load_file(lora)
    for module, (key, rows) in json.loads(Path(lora_map).read_text()).items():
        down = adapter[f"{module}.lora_down.weight"].float().flatten(1)
        up = adapter[f"{module}.lora_up.weight"].float().flatten(1)
        scale = adapter[f"{module}.alpha"].float().item() / down.shape[0]
        weight = model[key] if rows is None else model[key][rows[0]:rows[1]]
        weight.copy_((weight.float() + (up @ down).reshape(weight.shape) * scale).to(weight.dtype))
    save_file(model, output)


def mecha_merge(method: str, output: str, *inputs: str) -> None:
    import sd_mecha
    from sd_mecha.extensions.builtin.merge_methods import linear, ties

    models = [sd_mecha.model(path) for path in inputs]

    def add_difference_ties() -> object:
        # the graph `sd_mecha.add_difference_ties` builds; the wrapper itself fails in 1.1.8
        # (it compares the merge space of the TIES node, which is None)
        base, *others = models
        delta = ties.ties_sum(*(linear.subtract(model, base) for model in others), k=0.2)
        return linear.add_difference(base, delta, alpha=1.0) | base

    recipes = {
        "weighted_sum": lambda: sd_mecha.weighted_sum(*models, alpha=0.5),
        "add_difference": lambda: sd_mecha.add_difference(*models, alpha=1.0),
        "ties": add_difference_ties,
    }
    sd_mecha.merge(recipes[method](), output=output)


def diffusers_fuse(output: str, base: str, lora: str, config: str) -> None:
    """diffusers: from_single_file with a local config folder, load_lora_weights, fuse_lora,
    save_pretrained."""
    import diffusers
    import torch

    index = json.loads((Path(config) / "model_index.json").read_text())
    pipeline_class = getattr(diffusers, index["_class_name"])
    pipe = pipeline_class.from_single_file(base, config=config, torch_dtype=torch.float16)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    pipe.save_pretrained(output)


DRIVERS = {
    "baseline": baseline,
    "baseline-direct": lambda *args: baseline(*args, direct=True),
    "full-load-weighted-sum": full_load_weighted_sum,
    "full-load-add-difference": full_load_add_difference,
    "full-load-bake": full_load_bake,
    "sd-mecha-weighted-sum": lambda *args: mecha_merge("weighted_sum", *args),
    "sd-mecha-add-difference": lambda *args: mecha_merge("add_difference", *args),
    "sd-mecha-ties": lambda *args: mecha_merge("ties", *args),
    "diffusers-fuse-lora": diffusers_fuse,
}

if __name__ == "__main__":
    DRIVERS[sys.argv[1]](*sys.argv[2:])
