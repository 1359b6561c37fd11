"""Producing the next tensors on worker threads while the writer writes this one.

The writer asks for tensors one at a time in a known order; with `workers` >= 1 the
tensors that come next are produced ahead on that many threads, within a byte budget,
so memory stays bounded while computing (a cast, a merge, a bake) overlaps the disk.
Every tensor is produced by the same function whichever thread runs it, so the output
does not depend on the number of workers.

When the workers do heavy math (merges, bakes), the calling thread's torch pool is set to
one thread (`single_threaded_torch`): splitting megabyte-sized slices across its pool
costs more in synchronisation than it gains (many times more on a busy machine). OpenMP
and MKL keep thread counts per thread: a worker starts with a new thread's default (every
core), which merges gain from when the budget leaves one large tensor in flight (SDXL add
difference 18-19 s, 22-28 s with one thread per worker). Where results must not depend on
the load, `threads` fixes each worker's count: LAPACK (an SVD) splits its work by the
threads MKL finds free, and its bits then change from run to run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

# glibc mallopt parameters: allocations at least this large are mapped on their own; free
# memory beyond this much at the top of an arena goes back to the system
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
LARGE_ALLOCATION = 32 << 20
ARENA_SLACK = 64 << 20
_allocator_bounded = False

DEFAULT_WORKERS = min(2, os.cpu_count() or 1)  # more adds memory and little speed (I/O-bound)
AHEAD_BUDGET = 192 << 20  # bytes of tensors computed ahead of the writer


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """torch intra-op threads set to 1 inside the block, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _set_torch_threads(count: int | None) -> None:
    if count is not None:
        import torch

        torch.set_num_threads(count)


def bound_allocator_caches() -> None:
    """Bound what the allocator keeps of freed tensors (glibc; no-op elsewhere).

    Each worker thread allocates from its own malloc arena, and glibc raises its mmap
    threshold (up to 32 MiB) whenever a large block is freed, after which freed tensors
    stay cached in the arenas without a bound of our choosing. Fixed thresholds keep
    tensors under 32 MiB (the temporaries of a merge slice or a baked layer) in the
    arenas, reused without page faults, and at most 64 MiB of free memory per arena;
    larger tensors are mapped on their own and unmapped when freed. Fresh pages are
    expensive, on virtual machines most of all (each also faults in the host): with
    an 8 MiB threshold an SDXL bake spent 29 s in the kernel, with these 10 s. (Trimming
    the arenas after each tensor instead costs more time than the merge math.)
    """
    global _allocator_bounded
    if _allocator_bounded:
        return
    _allocator_bounded = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION)
        libc.mallopt(_M_TRIM_THRESHOLD, ARENA_SLACK)
    except (OSError, AttributeError):
        pass


class Prefetcher:
    """`get(key)` returns `compute(key)`, computed ahead in `order` by `workers` threads
    (0: computed when asked, on the caller's thread).

    At most `workers` keys are ahead, and no more than `budget` bytes of them by `cost`
    (an estimate of the memory a key holds while computed and waiting), except that one
    key is always allowed so a single huge tensor still proceeds. `threads`: torch's
    thread count on each worker (None: a new thread's default).
    """

    def __init__(self, compute: Callable[[str], Any], workers: int | None = None, *,
                 cost: Callable[[str], int] = lambda key: 0, budget: int = 0, threads: int | None = None) -> None:
        self.compute = compute
        self.threads = threads
        self.workers = DEFAULT_WORKERS if workers is None else max(0, workers)
        self.cost = cost
        self.budget = budget
        self._order: Sequence[str] = ()
        self._next = 0
        self._pending: dict[str, Future[Any]] = {}
        self._pending_cost = 0
        self._started: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None

    def start(self, order: Sequence[str]) -> "Prefetcher":
        """Begin computing ahead in `order` (the order `get` will be called in)."""
        self._order = order
        if self.workers > 0:
            bound_allocator_caches()
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sdkit-ahead",
                                            initializer=_set_torch_threads, initargs=(self.threads,))
        return self

    def get(self, key: str) -> Any:
        if self._pool is None:
            return self.compute(key)
        future = self._pending.pop(key, None)
        if future is None:  # asked before (or out of) the expected order: compute it now
            future = self._pool.submit(self.compute, key)
            self._started.add(key)
        else:
            self._pending_cost -= self.cost(key)
        self._top_up()
        return future.result()

    def _top_up(self) -> None:
        assert self._pool is not None
        while len(self._pending) < self.workers and self._next < len(self._order):
            key = self._order[self._next]
            if key in self._started:
                self._next += 1
                continue
            cost = self.cost(key)
            if self._pending and self._pending_cost + cost > self.budget:
                return
            self._next += 1
            self._started.add(key)
            self._pending[key] = self._pool.submit(self.compute, key)
            self._pending_cost += cost

    def close(self) -> None:
        """Stop: pending work is cancelled or awaited, its results dropped."""
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            self._pending_cost = 0
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
