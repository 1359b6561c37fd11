"""Merge methods timed against a plain copy, before and after a change:
`python tests/bench/bench_merge_methods.py [--before CHECKOUT] [--flux]`.

Each merge runs as its own process right after a baseline run (a plain read of its
inputs + write of its output's bytes, fsynced), on the SD1.5-shaped inputs the bench
report builds ($SDKIT_BENCH_DIR); `--flux` adds two FLUX.1-shaped fp8 files (2 double +
4 single blocks, built once there). `--before` names another checkout's root (e.g. from
`git archive main sdkit | tar -x -C DIR`), whose sdkit runs the same merges in the same
run: ratios of the two are comparable, absolute times on a shared machine are not.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))

from bench_measure import REPO, Measurement, driver, measure, remove, size_of  # noqa: E402
from bench_models import build_inputs  # noqa: E402
from conftest import _random_tensor  # noqa: E402
from test_bench_report import _warm  # noqa: E402

FLUX_BLOCKS = dict(num_layers=2, num_single_layers=4)


def flux_inputs(cache: Path) -> list[Path]:
    """Two FLUX.1-dev-shaped fp8 e4m3fn files with different random values."""
    from released import RELEASES

    from sdkit.io import LazyTensor, write_safetensors

    model = RELEASES["FLUX.1-dev"]
    shapes = model.single_file(dict(model.config, **FLUX_BLOCKS))
    paths = []
    for offset, name in ((0, "a"), (100_000, "b")):
        path = cache / f"flux-2d4s-fp8-{name}.safetensors"
        if not path.exists():
            tensors = {key: LazyTensor("F8_E4M3", shape, _random_tensor(shape, torch.float8_e4m3fn, offset + i))
                       for i, (key, shape) in enumerate(sorted(shapes.items()))}
            write_safetensors(path, tensors, {"format": "pt"}, overwrite=True)
        paths.append(path)
    return paths


def merges(sd15: list[Path], flux: list[Path]) -> list[tuple[str, list[Path], list[str]]]:
    a, b, c = sd15
    rows = [("SD1.5 weighted sum α=0.5", [a, b], ["--method", "weighted_sum"]),
            ("SD1.5 TIES k=0.2 (base + 2)", [a, b, c], ["--method", "ties"]),
            ("SD1.5 DARE p=0.9 (base + 2)", [a, b, c], ["--method", "dare"]),
            ("SD1.5 SLERP α=0.5", [a, b], ["--method", "slerp"])]
    if flux:
        rows += [("FLUX fp8 weighted sum α=0.5", flux, ["--method", "weighted_sum"]),
                 ("FLUX fp8 TIES k=0.2 (base + 1)", flux, ["--method", "ties"])]
    return rows


def paired(argv: list[str], reads: list[Path], out: Path, root: Path) -> tuple[Measurement, Measurement]:
    _warm(reads)  # neither run of the pair pays for a cold page cache alone
    result = measure(argv, root=root)
    written = size_of(out)
    remove(out)
    base_out = out.with_suffix(".bin")
    baseline = measure(driver("baseline", str(base_out), str(written), *map(str, reads)))
    remove(base_out)
    return result, baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="another checkout's root, measured alike")
    parser.add_argument("--flux", action="store_true", help="add the FLUX.1-shaped fp8 merges")
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    cache = args.cache or Path(os.environ.get("SDKIT_BENCH_DIR", Path(tempfile.gettempdir()) / "sdkit-bench"))
    cache.mkdir(parents=True, exist_ok=True)
    inputs = build_inputs(cache, "sd15")
    flux = flux_inputs(cache) if args.flux else []
    roots = {"after": REPO} | ({"before": args.before.resolve()} if args.before else {})
    out = cache / "bench-merge-out.safetensors"
    print("| merge | " + " | ".join(f"{name}: time ×copy | {name}: RSS ×copy (MiB)" for name in roots) + " |")
    print("|---|" + "---|---|" * len(roots))
    for label, reads, options in merges([inputs.a, inputs.b, inputs.c], flux):
        cells = []
        for root in roots.values():
            argv = [sys.executable, "-m", "sdkit", "--quiet", "merge", *map(str, reads), *options, "-o", str(out)]
            result, baseline = paired(argv, reads, out, root)
            if not result.ok:
                cells += [f"failed: {result.error}", ""]
                continue
            cells += [f"{result.wall / baseline.wall:.2f} ({result.wall:.1f} s / {baseline.wall:.1f} s)",
                      f"{result.rss_mb / baseline.rss_mb:.1f} ({result.rss_mb:,.0f} / {baseline.rss_mb:,.0f})"]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
