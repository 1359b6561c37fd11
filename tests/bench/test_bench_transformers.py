"""Key-layout conversion of a FLUX.1-dev-shaped transformer at full size (12B parameters,
fp8 e4m3fn, 11.9 GB; real key names and shapes, random values), timed as a separate
process against a plain copy of the same file in the same run, with its peak RSS.

`SDKIT_BENCH_BIG=0` skips it; it also skips (saying so) when the disk cannot hold the
input and two outputs. `SDKIT_BENCH_FLUX_BLOCKS=D,S` keeps D double and S single blocks of
the released 19 and 38 (the same tensors, fewer of them) where the disk is small: the
ratios are what the bench reports. The input is built once into $SDKIT_BENCH_DIR.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))

from bench_measure import REPO, driver, measure, remove, sdkit  # noqa: E402
from conftest import cached_synthetic  # noqa: E402
from released import RELEASES, single_file_shapes  # noqa: E402

def _flux_shapes() -> tuple[dict[str, tuple[int, ...]], str]:
    """FLUX.1-dev's single-file shapes, with fewer blocks when asked; and a file name that
    says which."""
    model = RELEASES["FLUX.1-dev"]
    blocks = os.environ.get("SDKIT_BENCH_FLUX_BLOCKS")
    if not blocks:
        return single_file_shapes(model), "flux1-dev-fp8.safetensors"
    double, single = (int(n) for n in blocks.split(","))
    config = dict(model.config, num_layers=double, num_single_layers=single)
    return model.single_file(config), f"flux1-dev-fp8-{double}d{single}s.safetensors"


def _room_for(folder: Path, name: str, size: int, files: int) -> bool:
    have = shutil.disk_usage(folder).free
    built = folder / name
    needed = files * size - (built.stat().st_size if built.exists() else 0)
    return have > needed + (2 << 30)


@pytest.mark.skipif(os.environ.get("SDKIT_BENCH_BIG") == "0", reason="SDKIT_BENCH_BIG=0")
def test_bench_flux_single_file_to_diffusers_and_back(bench_cache: Path, tmp_path: Path) -> None:
    shapes, name = _flux_shapes()
    size = sum(math.prod(shape) for shape in shapes.values())  # one byte a value in fp8
    if not _room_for(bench_cache, name, size, 3):
        pytest.skip(f"{bench_cache}: not enough free disk for a {size / 1e9:.1f} GB input and its outputs "
                    "(SDKIT_BENCH_FLUX_BLOCKS=D,S makes it smaller)")
    source = cached_synthetic(bench_cache / name, shapes, dtype="F8_E4M3")
    size = source.stat().st_size
    diffusers_file, back = tmp_path / "flux-diffusers.safetensors", tmp_path / "flux-back.safetensors"
    copy = tmp_path / "copy.safetensors"
    copied = measure([sys.executable, "-c", f"import shutil; shutil.copyfile({str(source)!r}, {str(copy)!r})"])
    remove(copy)
    to_diffusers = measure(sdkit("convert", str(source), "--to", "diffusers", "-o", str(diffusers_file)))
    to_single = measure(sdkit("convert", str(diffusers_file), "--to", "single-file", "-o", str(back)))
    print(f"\nflux convert: {source.name} ({size / 2**30:.2f} GiB; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores)")
    for name, run in (("plain copy (baseline)", copied), ("--to diffusers", to_diffusers),
                      ("--to single-file (back)", to_single)):
        assert run.ok, run.error
        print(f"  {name:<26} {run.wall:8.1f} s  {run.wall / copied.wall:5.2f}x copy  {run.rss_mb:8.0f} MiB RSS")
    remove(diffusers_file)
    remove(back)


FLUX_BF16_BYTES = 23_800_000_000
GGUF_SHAPES = os.environ.get("SDKIT_BENCH_GGUF_SHAPES")  # "reduced": a few blocks, to check the bench runs


def _gguf_source_shapes() -> dict[str, tuple[int, ...]]:
    shapes = single_file_shapes(RELEASES["FLUX.1-dev"])
    if GGUF_SHAPES != "reduced":
        return shapes
    return {name: shape for name, shape in shapes.items()
            if not name.startswith(("double_blocks.", "single_blocks.")) or ".0." in name}


@pytest.mark.skipif(os.environ.get("SDKIT_BENCH_BIG") == "0", reason="SDKIT_BENCH_BIG=0")
def test_bench_flux_to_gguf(bench_cache: Path, tmp_path: Path) -> None:
    """--to gguf --quant Q8_0 and Q4_K of a FLUX.1-dev-shaped bf16 file (23.8 GB; its
    outputs 12.7 and 6.8 GB), against a plain copy in the same run."""
    shapes = _gguf_source_shapes()
    name = "flux1-dev-bf16.safetensors" if GGUF_SHAPES != "reduced" else "flux1-dev-bf16-reduced.safetensors"
    needed = FLUX_BF16_BYTES * 2.8 if GGUF_SHAPES != "reduced" else 4 << 30
    built = bench_cache / name
    if shutil.disk_usage(bench_cache).free + (built.stat().st_size if built.exists() else 0) < needed:
        pytest.skip(f"{bench_cache}: not enough free disk for a bf16 FLUX.1-dev input, a copy and a GGUF")
    source = cached_synthetic(built, shapes, dtype="BF16")
    copy = tmp_path / "copy.safetensors"
    copied = measure([sys.executable, "-c", f"import shutil; shutil.copyfile({str(source)!r}, {str(copy)!r})"])
    remove(copy)
    print(f"\nflux --to gguf: {source.name} ({source.stat().st_size / 2**30:.2f} GiB; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"  {'plain copy (baseline)':<26} {copied.wall:8.1f} s  {1:5.2f}x copy  {copied.rss_mb:8.0f} MiB RSS")
    assert copied.ok, copied.error
    for quant in ("Q8_0", "Q4_K"):
        output = tmp_path / f"flux-{quant}.gguf"
        run = measure(sdkit("convert", str(source), "--to", "gguf", "--quant", quant, "-o", str(output)))
        assert run.ok, run.error
        print(f"  {'--quant ' + quant:<26} {run.wall:8.1f} s  {run.wall / copied.wall:5.2f}x copy  "
              f"{run.rss_mb:8.0f} MiB RSS  ({output.stat().st_size / 2**30:.2f} GiB)")
        remove(output)


def _kohya_flux_lora(shapes: dict[str, tuple[int, ...]], rank: int) -> dict[str, torch.Tensor]:
    """A rank-`rank` LoRA in kohya's FLUX.1 names on every linear layer of the double and
    single blocks (what sd-scripts' networks/lora_flux.py trains by default), bf16 factors."""
    generator = torch.Generator().manual_seed(0)
    lora = {}
    for name, shape in sorted(shapes.items()):
        if not name.startswith(("double_blocks.", "single_blocks.")) or not name.endswith(".weight") \
                or len(shape) != 2:
            continue
        module = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
        lora[f"{module}.lora_down.weight"] = (torch.randn(rank, shape[1], generator=generator) * 0.01).bfloat16()
        lora[f"{module}.lora_up.weight"] = (torch.randn(shape[0], rank, generator=generator) * 0.01).bfloat16()
        lora[f"{module}.alpha"] = torch.tensor(float(rank))
    return lora


@pytest.mark.skipif(os.environ.get("SDKIT_BENCH_BIG") == "0", reason="SDKIT_BENCH_BIG=0")
def test_bench_flux_lora_bake(bench_cache: Path, tmp_path: Path) -> None:
    """lora bake of a rank-32 all-layer kohya FLUX.1 LoRA into a FLUX.1-dev-shaped bf16
    diffusion model and into its scaled-fp8 cast, each against a plain copy of that base."""
    from safetensors.torch import load_file, save_file

    shapes, name = _flux_shapes()
    bf16_bytes = 2 * sum(math.prod(shape) for shape in shapes.values())
    if not _room_for(bench_cache, name, bf16_bytes, 4):
        pytest.skip(f"{bench_cache}: not enough free disk for a bf16 FLUX.1 base, its fp8 cast and the outputs "
                    "(SDKIT_BENCH_FLUX_BLOCKS=D,S makes it smaller)")
    bf16 = cached_synthetic(bench_cache / name.replace("-fp8", "-bf16"), shapes, dtype="BF16")
    scaled = bench_cache / name.replace("-fp8", "-fp8-scaled")
    if not scaled.exists():
        assert measure(sdkit("convert", str(bf16), "--dtype", "fp8_e4m3fn", "--fp8-scaling", "scaled",
                             "-o", str(scaled))).ok
    lora = tmp_path / "flux-lora-r32.safetensors"
    save_file(_kohya_flux_lora(shapes, 32), lora)
    start = _process_start()
    print(f"\nflux lora bake: rank 32, {lora.stat().st_size / 2**20:.0f} MiB LoRA (load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; process start {start:.1f} s)")
    # ComfyUI's way, on the bf16 base: the whole model loaded, each weight patched in place, saved
    lora_map = tmp_path / "lora-map.json"
    lora_map.write_text(json.dumps({key[: -len(".lora_down.weight")]: [_bfl_key(key), None]
                                    for key in load_file(lora) if key.endswith(".lora_down.weight")}))
    for base, label in ((bf16, "bf16"), (scaled, "fp8 scaled")):
        copy, out = tmp_path / "copy.safetensors", tmp_path / "baked.safetensors"
        copied = measure([sys.executable, "-c", f"import shutil; shutil.copyfile({str(base)!r}, {str(copy)!r})"])
        remove(copy)
        baked = measure(sdkit("lora", "bake", str(base), str(lora), "-o", str(out)))
        remove(out)
        assert copied.ok and baked.ok, baked.error
        print(f"  {label + ' base':<14} {base.stat().st_size / 2**30:6.2f} GiB  copy {copied.wall:6.1f} s  "
              f"bake {baked.wall:6.1f} s  {baked.wall / copied.wall:5.2f}x copy "
              f"({(baked.wall - start) / copied.wall:4.2f}x past the start)  {baked.rss_mb:6.0f} MiB RSS")
        if label == "bf16" and _fits_in_memory(base):
            peer = measure(driver("full-load-bake", str(out), str(base), str(lora), str(lora_map)))
            remove(out)
            assert peer.ok, peer.error
            print(f"  {'  full load':<14} (ComfyUI-style: load all, patch, save) {peer.wall:6.1f} s  "
                  f"{peer.wall / copied.wall:5.2f}x copy  {peer.rss_mb:6.0f} MiB RSS")


def _process_start() -> float:
    """Seconds an sdkit process spends before its first byte (Python, torch and the
    operation's modules imported): the same at any model size, so a ratio on a reduced
    model is also shown past it, as a full-size one (12B parameters) would see it."""
    return measure([sys.executable, "-c", "import torch, sdkit.cli.main, sdkit.ops.lora.bake, sdkit.ops.merge"]).wall


def _bfl_key(lora_key: str) -> str:
    """The base key a kohya FLUX.1 module names (`lora_unet_double_blocks_0_img_attn_qkv`)."""
    module = lora_key[len("lora_unet_"): -len(".lora_down.weight")]
    blocks, index, layer = re.match(r"(double_blocks|single_blocks)_(\d+)_(.*)", module).groups()
    for dotted in ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                   "txt_mlp.0", "txt_mlp.2", "img_mod.lin", "txt_mod.lin", "modulation.lin"):
        if layer == dotted.replace(".", "_"):
            layer = dotted
    return f"{blocks}.{index}.{layer}.weight"


def _fits_in_memory(path: Path) -> bool:
    """Whether a full load (the file, its float32 working copies of one layer and the
    saved copy) leaves room in RAM."""
    import psutil

    return 2.5 * path.stat().st_size < psutil.virtual_memory().available


def _tuned_twin(base: Path, path: Path) -> Path:
    """`base` plus small random changes on every tensor (a stand-in for a fine-tune),
    streamed tensor by tensor; reused when already built from a base of these shapes."""
    from sdkit.io import LazyTensor, lazy_tensors, open_model, write_safetensors

    with open_model(base) as model:
        shapes = {name: info.shape for name, info in model.infos.items()}
        if path.exists():
            with open_model(path) as built:
                if {name: info.shape for name, info in built.infos.items()} == shapes:
                    return path

        def changed(lazy: LazyTensor, seed: int) -> torch.Tensor:
            value = lazy.load()
            noise = torch.randn(value.shape, generator=torch.Generator().manual_seed(seed)) * 0.01
            return (value.float() + noise).to(value.dtype)

        tensors = {name: LazyTensor(lazy.dtype, lazy.shape, partial(changed, lazy, seed))
                   for seed, (name, lazy) in enumerate(sorted(lazy_tensors(model).items()))}
        write_safetensors(path, tensors, {"format": "pt"}, overwrite=True)
    return path


@pytest.mark.skipif(os.environ.get("SDKIT_BENCH_BIG") == "0", reason="SDKIT_BENCH_BIG=0")
def test_bench_flux_lora_extract(bench_cache: Path, tmp_path: Path) -> None:
    """`lora extract --rank 64 --randomized` from two bf16 FLUX.1-dev-shaped files (23.8 GB
    each at full size; `SDKIT_BENCH_FLUX_BLOCKS=D,S` for fewer blocks), against a plain
    read of both files in the same run."""
    shapes, name = _flux_shapes()
    name = name.replace("-fp8", "-bf16")
    size = 2 * sum(math.prod(shape) for shape in shapes.values())
    if not _room_for(bench_cache, name, size, 2):
        pytest.skip(f"{bench_cache}: not enough free disk for two {size / 1e9:.1f} GB inputs "
                    "(SDKIT_BENCH_FLUX_BLOCKS=D,S makes them smaller)")
    base = cached_synthetic(bench_cache / name, shapes, dtype="BF16")
    tuned = _tuned_twin(base, bench_cache / name.replace(".safetensors", "-tuned.safetensors"))
    read = ("import sys\nfor path in sys.argv[1:]:\n    with open(path, 'rb') as f:\n"
            "        while f.read(64 << 20):\n            pass")
    baseline = measure([sys.executable, "-c", read, str(base), str(tuned)])
    lora = tmp_path / "extract.safetensors"
    extract = measure(sdkit("lora", "extract", str(tuned), str(base), "-o", str(lora), "--rank", "64", "--randomized"))
    print(f"\nflux lora extract: 2 x {base.name} ({base.stat().st_size / 2**30:.2f} GiB each; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    for label, run in (("plain read of both (baseline)", baseline), ("extract --rank 64 --randomized", extract)):
        assert run.ok, run.error
        print(f"  {label:<32} {run.wall:8.1f} s  {run.wall / baseline.wall:6.2f}x read  {run.rss_mb:8.0f} MiB RSS")
    print(f"  LoRA: {lora.stat().st_size / 2**20:.0f} MiB")
    remove(lora)


FLUX_MERGES = (  # (label, inputs, options): the inputs are A, B and C of one precision
    ("weighted sum α=0.5", 2, ["--method", "weighted_sum"]),
    ("add difference α=1", 3, ["--method", "add_difference"]),
    ("TIES k=0.2 (base + 2)", 3, ["--method", "ties"]),
    ("DARE p=0.9 (base + 2)", 3, ["--method", "dare"]),
)
FLUX_MERGE_BARS = {"weighted sum α=0.5": (1.25, 2.0), "add difference α=1": (1.25, 2.0)}  # bf16, fp8; else 3


@pytest.mark.skipif(os.environ.get("SDKIT_BENCH_BIG") == "0", reason="SDKIT_BENCH_BIG=0")
def test_bench_flux_merges(bench_cache: Path, tmp_path: Path) -> None:
    """Merges of three FLUX.1-dev-shaped files (fp8 e4m3fn, then bf16), each against a
    plain read of its inputs and write of its output's bytes in the same run, and
    sd-mecha's weighted sum where it is installed."""
    from bench_measure import peer_installed
    from bench_merge_methods import paired

    from sdkit.ops.recipe_meta import file_sha256

    shapes, name = _flux_shapes()
    elements = sum(math.prod(shape) for shape in shapes.values())
    if not _room_for(bench_cache, name, elements, 3 + 3 * 2 + 2):  # 3 fp8 and 3 bf16 inputs, an output
        pytest.skip(f"{bench_cache}: not enough free disk for three {elements / 1e9:.1f} GB fp8 inputs, three bf16 "
                    "ones and an output (SDKIT_BENCH_FLUX_BLOCKS=D,S makes them smaller)")
    start = _process_start()
    print(f"\nflux merges: {name} shapes (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"process start {start:.1f} s)")
    out = tmp_path / "merged.safetensors"
    for dtype, label, bar_at in (("F8_E4M3", "fp8", 1), ("BF16", "bf16", 0)):
        inputs = [cached_synthetic(bench_cache / name.replace("-fp8", f"-{label}-{letter}"), shapes, dtype=dtype,
                                   seed=1000 * number)
                  for number, letter in enumerate("abc")]
        for path in inputs:  # a library's files are hashed once: every row finds their sha256 known
            file_sha256(path)
        rows = [(merge, sdkit("merge", *map(str, inputs[:count]), *options, "-o", str(out)), inputs[:count])
                for merge, count, options in FLUX_MERGES]
        if peer_installed("sd_mecha"):
            rows.append(("sd-mecha weighted sum", driver("sd-mecha-weighted-sum", str(out), *map(str, inputs[:2])),
                         inputs[:2]))
        for merge, argv, reads in rows:
            result, baseline = paired(argv, reads, out, REPO)
            assert result.ok, result.error
            bar = FLUX_MERGE_BARS.get(merge, (3.0, 3.0))[bar_at] if not merge.startswith("sd-mecha") else None
            print(f"  {label:<5} {merge:<24} {result.wall:7.1f} s  {result.wall / baseline.wall:5.2f}x read+write "
                  f"({baseline.wall:.1f} s; {(result.wall - start) / baseline.wall:4.2f}x past the start)  "
                  f"{result.rss_mb:7.0f} MiB RSS" + (f"  bar {bar}x" if bar else ""))
