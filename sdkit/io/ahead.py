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
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

# glibc mallopt parameters: allocations at least this large are mapped on their own; free
# memory beyond this much at the top of an arena goes back to the system
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
LARGE_ALLOCATION = 32 << 20
ARENA_SLACK = 64 << 20
_allocator_bounded = False

DEFAULT_WORKERS = min(2, os.cpu_count() or 1)  # more adds memory and little speed (I/O-bound)
AHEAD_BUDGET = 192 << 20  # bytes of tensors computed ahead of the writer
_slice_pool: ThreadPoolExecutor | None = None
_slice_pool_lock = threading.Lock()


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


def in_parallel(function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    """`function(item)` for each item, in order, made a few ahead on a process-wide pool of
    `DEFAULT_WORKERS` threads (one torch thread each): the slices of one tensor, when a
    method passes over them more than once. `function` must not itself wait on this pool."""
    global _slice_pool
    with _slice_pool_lock:
        if _slice_pool is None:
            _slice_pool = ThreadPoolExecutor(DEFAULT_WORKERS, thread_name_prefix="sdkit-slices",
                                             initializer=_set_torch_threads, initargs=(1,))
    window: deque[Future[Any]] = deque()
    for item in items:
        window.append(_slice_pool.submit(function, item))
        if len(window) > 2 * DEFAULT_WORKERS:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


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

    def made_in_order(self, items: Iterable[Any]) -> Iterator[Any]:
        """`items` in order, each callable among them replaced by what it returns: those
        are made on the worker threads, a few ahead of the one asked for (the pieces of
        one large tensor, made in parallel)."""
        if self._pool is None:
            yield from (item() if callable(item) else item for item in items)
            return
        window: deque[Any] = deque()
        for item in items:
            window.append(self._pool.submit(item) if callable(item) else item)
            if len(window) > 2 * self.workers:
                yield _made(window.popleft())
        while window:
            yield _made(window.popleft())

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


def _made(item: Any) -> Any:
    return item.result() if isinstance(item, Future) else item
