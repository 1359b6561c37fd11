"""Where a weighted sum of two fp8 e4m3fn tensors spends its time, stage by stage:
`python tests/bench/bench_fp8_stages.py [FOLDER]`.

Two files of one 302 MB fp8 tensor each (built once in FOLDER, default the bench cache)
are read a slice at a time as the merge engine reads them; each stage is timed over the
whole tensor on one thread, the way it ran before (torch's float8 → float32 conversion;
min/max of a float16 copy of each output slice for the NaN check) and the way it runs
now (`sdkit.io.float8.to_float32`; min/max of the float32 slice before the cast), beside
a plain read of both files and write of one, fsynced.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdkit.io import open_model
from sdkit.io.ahead import bound_allocator_caches
from sdkit.io.byte_span import read_elements
from sdkit.io.float8 import to_float32
from sdkit.ops.merge.compute import SLICE_ELEMENTS, _may_not_fit

SHAPE = (16384, 18432)
STAGES = ["read (pread, 2 inputs)", "decode before: .to(float32), 2 inputs", "decode now: to_float32, 2 inputs",
          "lerp", "encode .to(float8_e4m3fn)", "check before: aminmax(float16 copy)",
          "check now: aminmax(float32 slice)"]


def inputs(folder: Path) -> list[Path]:
    paths = [folder / f"fp8-stages-{seed}.safetensors" for seed in (1, 2)]
    for seed, path in zip((1, 2), paths):
        if not path.exists():
            from safetensors.torch import save_file

            generator = torch.Generator().manual_seed(seed)
            save_file({"w": (torch.randn(SHAPE, generator=generator) * 0.05).to(torch.float8_e4m3fn)}, str(path))
    return paths


def plain_copy(paths: list[Path], target: Path) -> float:
    started = time.perf_counter()
    with open(paths[0], "rb") as first, open(paths[1], "rb") as second, open(target, "wb") as out:
        while chunk := first.read(16 << 20):
            second.read(16 << 20)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    target.unlink()
    return time.perf_counter() - started


def stage_times(paths: list[Path]) -> dict[str, float]:
    times = dict.fromkeys(STAGES, 0.0)

    def clock(stage: str, action):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        result = action()
        times[stage] += time.perf_counter() - started
        return result

    models = [open_model(path) for path in paths]
    spans = [model.span("w") for model in models]
    count = SHAPE[0] * SHAPE[1]
    for start in range(0, count, SLICE_ELEMENTS):
        size = min(SLICE_ELEMENTS, count - start)
        raw = clock(STAGES[0], lambda: [read_elements(span, torch.float8_e4m3fn, start, size) for span in spans])
        before = clock(STAGES[1], lambda: [part.to(torch.float32) for part in raw])
        now = clock(STAGES[2], lambda: [to_float32(part) for part in raw])
        assert all(torch.equal(b.view(torch.int32), n.view(torch.int32)) for b, n in zip(before, now))
        values = clock(STAGES[3], lambda: torch.lerp(now[0], now[1], 0.3))
        piece = clock(STAGES[4], lambda: values.to(torch.float8_e4m3fn))
        clock(STAGES[5], lambda: torch.aminmax(piece.to(torch.float16)))
        clock(STAGES[6], lambda: _may_not_fit(values, torch.float8_e4m3fn))
    for model in models:
        model.close()
    return times


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(
        os.environ.get("SDKIT_BENCH_DIR", Path(tempfile.gettempdir()) / "sdkit-bench"))
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    bound_allocator_caches()  # as the merge engine runs
    paths = inputs(folder)
    copy = plain_copy(paths, folder / "fp8-stages-copy.bin")
    times = stage_times(paths)
    count = SHAPE[0] * SHAPE[1]
    print(f"fp8 e4m3fn tensor {list(SHAPE)} ({count / 1e6:.0f} MB), slices of {SLICE_ELEMENTS}; "
          f"plain read of both files + write of one, fsynced: {copy:.2f} s")
    for stage, seconds in times.items():
        print(f"  {stage:40s} {seconds:6.2f} s")
    before = sum(times[STAGES[i]] for i in (0, 1, 3, 4, 5))
    now = sum(times[STAGES[i]] for i in (0, 2, 3, 4, 6))
    print(f"  {'compute before / now':40s} {before:6.2f} s / {now:.2f} s")


if __name__ == "__main__":
    main()
