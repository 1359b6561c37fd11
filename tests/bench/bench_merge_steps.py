"""Merges in steps against one-step merges, time and peak memory:
`python tests/bench/bench_merge_steps.py [--cache DIR]`.

On the SD1.5-shaped fp16 inputs the bench report builds ($SDKIT_BENCH_DIR), each merge
runs as its own process (wall time and its own peak RSS, `bench_measure.measure`), with
the inputs in the page cache first. A merge in steps writes only its last step, so its
peak memory is compared with a one-step merge of the same method.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml
from bench_measure import REPO, measure, remove
from bench_models import build_inputs
from test_bench_report import _warm


def recipes(a: Path, b: Path, c: Path) -> dict[str, dict]:
    a, b, c = str(a), str(b), str(c)
    diff = {"method": "add_difference", "inputs": [a, b, c], "params": {"alpha": 0.5}}
    return {
        "add difference A, B, C → weighted sum with A": {"steps": {
            "diff": diff, "final": {"method": "weighted_sum", "inputs": ["diff", a], "params": {"alpha": 0.3}}}},
        "add difference A, B, C → TIES of A, it, B": {"steps": {
            "diff": diff, "final": {"method": "ties", "inputs": [a, "diff", b], "params": {"k": 0.2}}}},
        "TIES A, B, C → weighted sum with C": {"steps": {
            "t": {"method": "ties", "inputs": [a, b, c], "params": {"k": 0.2}},
            "final": {"method": "weighted_sum", "inputs": ["t", c], "params": {"alpha": 0.3}}}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    cache = args.cache or Path(os.environ.get("SDKIT_BENCH_DIR", Path(tempfile.gettempdir()) / "sdkit-bench"))
    cache.mkdir(parents=True, exist_ok=True)
    inputs = build_inputs(cache, "sd15")
    reads = [inputs.a, inputs.b, inputs.c]
    out = cache / "bench-steps-out.safetensors"
    runs = [("weighted sum A, B (one step)", [str(inputs.a), str(inputs.b), "--alpha", "0.3"]),
            ("TIES k=0.2 A, B, C (one step)", [*map(str, reads), "--method", "ties", "-p", "k=0.2"])]
    for label, recipe in recipes(*reads).items():
        path = cache / f"bench-steps-{len(runs)}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        runs.append((label + " (two steps)", ["--recipe", str(path)]))
    print("| merge | wall | peak RSS |\n|---|---|---|")
    for label, options in runs:
        _warm(reads)
        result = measure([sys.executable, "-m", "sdkit", "--quiet", "merge", *options, "-o", str(out)], root=REPO)
        remove(out)
        cells = (f"{result.wall:.1f} s", f"{result.rss_mb:,.0f} MiB") if result.ok else (f"failed: {result.error}", "")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
