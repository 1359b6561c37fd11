"""I/O benchmarks: hashing, header inspection and streaming copy of a full-size file,
each as a ratio to a plain-Python baseline measured in the same run."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

from sdkit.io import hash_file, lazy_tensors, open_model, write_safetensors

CHUNK = 16 << 20


def plain_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            digest.update(memoryview(buffer)[:count])
    return digest.hexdigest()


def report(name: str, seconds: float, size: int, baseline: float | None = None) -> None:
    rate = size / seconds / 2**30 if seconds else float("inf")
    ratio = f"  {baseline / seconds:6.2f}x baseline throughput" if baseline else ""
    print(f"  {name:<34} {seconds * 1000:9.1f} ms  {rate:6.2f} GiB/s{ratio}")


def two_parallel_sha256(path: Path) -> None:
    """Two independent hashlib passes in two threads: the best any two-digest hash can do
    on this machine right now (on two free cores, the time of one pass)."""
    other = threading.Thread(target=plain_sha256, args=(path,))
    other.start()
    plain_sha256(path)
    other.join()


def test_bench_hash_and_inspect(sd15_unet_file: Path, best_of) -> None:
    size = sd15_unet_file.stat().st_size
    plain_sha256(sd15_unet_file)  # warm the page cache
    baseline = ideal = ours = float("inf")
    for _ in range(3):  # interleaved, so all three see the same background load
        baseline = min(baseline, best_of(1, lambda: plain_sha256(sd15_unet_file)))
        ideal = min(ideal, best_of(1, lambda: two_parallel_sha256(sd15_unet_file)))
        ours = min(ours, best_of(1, lambda: hash_file(sd15_unet_file)))
    inspect = best_of(5, lambda: open_model(sd15_unet_file).close())
    assert hash_file(sd15_unet_file).sha256 == plain_sha256(sd15_unet_file)
    print(f"\nio: {sd15_unet_file.name} ({size / 2**30:.2f} GiB, page-cached; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    report("hashlib.sha256 (baseline)", baseline, size)
    report("2 x hashlib.sha256 in 2 threads", ideal, size, baseline)
    report("hash_file (sha256+autov3+legacy)", ours, size, baseline)
    print(f"  {'open_model (header only)':<34} {inspect * 1000:9.1f} ms")
    # the bar: 80% of plain hashlib. Two digests need the second core: on a loaded machine
    # compare with the two-thread line above before blaming hash_file.
    assert baseline / ours >= 0.8, "hash_file below 80% of hashlib's speed"
    assert inspect < 0.1


def test_bench_streaming_copy(sd15_unet_file: Path, tmp_path: Path, best_of) -> None:
    size = sd15_unet_file.stat().st_size
    target = tmp_path / "copy.safetensors"

    def plain_copy() -> None:
        shutil.copyfile(sd15_unet_file, target)
        target.unlink()

    def streaming_copy() -> None:
        with open_model(sd15_unet_file) as model:
            write_safetensors(target, lazy_tensors(model), model.metadata)
        target.unlink()

    baseline = best_of(2, plain_copy)
    ours = best_of(2, streaming_copy)
    print(f"\nio: copy of {sd15_unet_file.name}")
    report("shutil.copyfile (baseline)", baseline, size)
    report("open_model -> write_safetensors", ours, size, baseline)
