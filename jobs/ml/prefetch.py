"""Host work done while the GPU is busy, so that neither waits for the other.

`Prefetcher` runs an iterator ahead in a background thread, so the consumer does not wait for the items. The
training loop uses it to draw, tokenize, pad and pin the next batches while the current step runs: on a GPU
the step's host side is busy launching kernels, and tokenizing there would add to every step. The items and
their order are exactly the iterator's, so prefetching changes nothing in what is trained. Tokenizers and
torch release the GIL while they work, so the two threads do overlap.

`IdleHostWork` queues host jobs for the decoding loop (jobs/ml/decoding.py) to run, in the loop's own thread, at
the points where it would otherwise wait for the GPU: eval stages score the last batch's answers there.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

T = TypeVar("T")

_POLL_S = 0.1  # how often a producer blocked on a full queue looks whether it was closed
_CLOSE_WAIT_S = 60.0


class Prefetcher(Generic[T]):
    """Iterates `items` in a daemon thread, keeping up to `depth` items ready.

    An exception raised by `items` is raised again by `next()` in the consumer, after the items before it.
    `close()` stops the thread (also usable as a context manager); with `depth` 0 no thread is started and
    `items` is iterated in the caller's thread.
    """

    def __init__(self, items: Iterator[T], *, depth: int, name: str = "stl-prefetch") -> None:
        self._items = items
        self._queue: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=max(depth, 1))
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None  # None: inline, in the caller's thread
        if depth > 0:
            self._thread = threading.Thread(target=self._fill, name=name, daemon=True)
            self._thread.start()

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._thread is None:
            return next(self._items)
        if self._closed.is_set():
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "item":
            return value  # type: ignore[return-value]
        self._closed.set()  # the producer has stopped: later calls end the iteration instead of waiting
        if isinstance(value, BaseException):
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the producer and wait for it: it finishes the item it is making, at most (a producer blocked on
        a full queue sees the flag within _POLL_S). Queued items are not drained, which would let it make one
        more. A producer stuck for longer than _CLOSE_WAIT_S is left behind (a daemon thread)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=_CLOSE_WAIT_S)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _fill(self) -> None:
        try:
            for item in self._items:
                if not self._put("item", item):
                    return
        except BaseException as e:  # handed to the consumer, which raises it where it would have been raised
            self._put("error", e)
            return
        self._put("end", None)

    def _put(self, kind: str, value: object) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put((kind, value), timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False


class IdleHostWork:
    """Host work (no CUDA) for the decoding loop to do while the GPU decodes: the loop runs queued jobs,
    oldest first, at the points where it would otherwise wait for the device (a look for the end of every
    row, the tokens' copy to the host), for as long as the device still has work queued. What is left
    runs in `run_all`. The jobs' results cannot depend on when they run, only the time they take. A job's
    error is raised by `run_all`, not inside the loop, which would take it for a decoding failure."""

    def __init__(self) -> None:
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._error: Exception | None = None
        self.seconds_while_decoding = 0.0  # what jobs took inside the loop, where the GPU was busy anyway
        self.done_while_decoding = 0

    def add(self, job: Callable[[], None]) -> None:
        self._jobs.append(job)

    def run_while(self, busy: Callable[[], bool]) -> None:
        """Jobs, one at a time, while `busy()` (the device has queued work) and any are left."""
        if not self._jobs or self._error is not None:
            return
        started = time.perf_counter()
        try:
            while self._jobs and busy():
                self._jobs[0]()
                self._jobs.popleft()
                self.done_while_decoding += 1
        except Exception as e:
            self._error = e  # the job stays queued; run_all raises this
        self.seconds_while_decoding += time.perf_counter() - started

    def run_all(self) -> None:
        if self._error is not None:
            raise self._error
        while self._jobs:
            self._jobs.popleft()()
