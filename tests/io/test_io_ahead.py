"""Work made ahead on threads comes back in the order it was asked for, failures included."""

from __future__ import annotations

import threading
import time

import pytest

from sdkit.io import ahead
from sdkit.io.ahead import Prefetcher, in_parallel


def slow_square(value: int) -> tuple[int, str]:
    time.sleep(0.001 * (value % 4))  # later items often finish first
    return value * value, threading.current_thread().name


def test_in_parallel_keeps_the_order_and_uses_the_slice_pool() -> None:
    made = list(in_parallel(slow_square, range(40)))
    assert [value for value, _ in made] == [value * value for value in range(40)]
    threads = {name for _, name in made}
    assert threads and all(name.startswith("sdkit-slices") for name in threads)
    assert len(threads) <= ahead.DEFAULT_WORKERS


def test_in_parallel_reads_its_items_lazily_and_raises_where_an_item_failed() -> None:
    asked: list[int] = []

    def items():
        for value in range(100):
            asked.append(value)
            yield value

    def fails_at_seven(value: int) -> int:
        if value == 7:
            raise ValueError("seven")
        return value

    made = in_parallel(fails_at_seven, items())
    assert [next(made) for _ in range(3)] == [0, 1, 2]
    assert len(asked) <= 3 + 2 * ahead.DEFAULT_WORKERS + 1  # a bounded window ahead
    with pytest.raises(ValueError, match="seven"):
        list(made)


@pytest.mark.parametrize("workers", [0, 2])
def test_made_in_order_mixes_ready_items_and_functions(workers: int) -> None:
    items = [1, lambda: 2, 3, lambda: 4]
    with Prefetcher(lambda key: key, workers).start([]) as prefetcher:
        assert list(prefetcher.made_in_order(items)) == [1, 2, 3, 4]
