"""Baking weight-dependent adapters (DoRA) on FLUX's fused layers: a single-file base
(the fused `qkv` / `linear1` tensors) against a diffusers base (q, k, v and the MLP input
kept apart, so the layer's weight is put back together and its delta cut by rows).

    python tests/bench/bench_split_layer_bake.py [--rank 16] [--dir /tmp/split-bench]

A one-block FLUX.1 of the released width (3072; random bf16 weights, 0.5 GB) in both
conventions and a kohya DoRA on `double_blocks.0.img_attn.qkv` and `single_blocks.0.linear1`.
Prints each bake's wall time and the largest relative difference between the two results
(in the same names; 0 means bit-identical).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "ops")]

from transformer_loras import converted, load, relative_error, save

from fixtures.families.released import flux_bfl_shapes
from sdkit.ops.lora.bake import AdapterInput, BakeOptions, bake_loras

CONFIG = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
          "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
          "axes_dims_rope": (16, 56, 56)}
LAYERS = ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1")


def dora(single: dict[str, torch.Tensor], rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    lora = {}
    for layer in LAYERS:
        weight = single[layer + ".weight"].float()
        name = "lora_unet_" + layer.replace(".", "_")
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=generator) * 0.01
        lora[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=generator) * 0.01
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
        lora[f"{name}.dora_scale"] = weight.norm(dim=1, keepdim=True) * 1.01
    return lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/split-layer-bench"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    single = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
              for name, shape in flux_bfl_shapes(CONFIG).items()}
    bases = {"single-file": save(single, args.dir / "single.safetensors"),
             "diffusers": save(converted(single, "ldm_to_diffusers"), args.dir / "diffusers.safetensors")}
    lora = save(dora(single, args.rank, generator), args.dir / "dora.safetensors")
    results = {}
    for label, base in bases.items():
        out = args.dir / f"baked-{label}.safetensors"
        start = time.perf_counter()
        bake_loras(base, [AdapterInput(str(lora))], out, BakeOptions(), overwrite=True)
        print(f"{label} base: {time.perf_counter() - start:.2f} s")
        results[label] = load(out)
    same_names = converted(results["single-file"], "ldm_to_diffusers")
    worst = max(relative_error(same_names[k].float(), v.float()) for k, v in results["diffusers"].items())
    print(f"largest relative difference between the two: {worst:.3g}")


if __name__ == "__main__":
    main()
