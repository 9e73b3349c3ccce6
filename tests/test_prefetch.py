"""The prefetcher that makes training batches ahead of the step (jobs/ml/prefetch.py)."""

from __future__ import annotations

import itertools
import threading
import time
from typing import TYPE_CHECKING

import pytest

from stl.jobs.ml.prefetch import Prefetcher

if TYPE_CHECKING:
    from collections.abc import Iterator


def test_items_come_in_order_and_the_iteration_ends_with_them() -> None:
    with Prefetcher(iter(range(50)), depth=3) as items:
        assert list(items) == list(range(50))
        assert list(items) == []  # ended: no wait for a producer that is gone


def test_an_error_is_raised_in_the_consumer_after_the_items_before_it() -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("bad row 3")

    prefetcher = Prefetcher(items(), depth=2)
    assert next(prefetcher) == 1
    assert next(prefetcher) == 2
    with pytest.raises(ValueError, match="bad row 3"):
        next(prefetcher)
    with pytest.raises(StopIteration):
        next(prefetcher)
    prefetcher.close()


def test_the_producer_runs_ahead_by_depth_items_in_its_own_thread() -> None:
    made: list[tuple[int, str]] = []

    def items() -> Iterator[int]:
        for number in itertools.count():
            made.append((number, threading.current_thread().name))
            yield number

    with Prefetcher(items(), depth=2, name="test-prefetch") as prefetcher:
        assert next(prefetcher) == 0
        deadline = time.monotonic() + 5
        while len(made) < 4 and time.monotonic() < deadline:  # 1 taken, 2 queued, 1 waiting to be put
            time.sleep(0.01)
        time.sleep(0.05)
        assert len(made) == 4, made
        assert {name for _number, name in made} == {"test-prefetch"}


def test_close_stops_a_producer_blocked_on_a_full_queue_without_making_more() -> None:
    made: list[int] = []

    def items() -> Iterator[int]:
        for number in itertools.count():
            made.append(number)
            yield number

    prefetcher = Prefetcher(items(), depth=1, name="test-blocked")
    assert next(prefetcher) == 0
    deadline = time.monotonic() + 5
    while len(made) < 3 and time.monotonic() < deadline:  # 1 taken, 1 queued, 1 blocked on the full queue
        time.sleep(0.01)
    started = time.monotonic()
    prefetcher.close()
    assert time.monotonic() - started < 2
    assert made == [0, 1, 2]  # closing does not make room for one more (a window read, in training)
    assert not any(thread.name == "test-blocked" for thread in threading.enumerate())
    with pytest.raises(StopIteration):
        next(prefetcher)


def test_depth_zero_iterates_in_the_callers_thread() -> None:
    names: list[str] = []

    def items() -> Iterator[int]:
        for number in range(3):
            names.append(threading.current_thread().name)
            yield number

    with Prefetcher(items(), depth=0) as prefetcher:
        assert list(prefetcher) == [0, 1, 2]
    assert names == [threading.current_thread().name] * 3
