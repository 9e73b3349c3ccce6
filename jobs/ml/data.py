"""Sampling training data: k-shot sets, the examples-proportional task mixture, and length-grouped batches.

Every draw is seeded and resumable, so a restarted run sees the same examples in the same order.
Cheap to import (no torch): rows are read through `sources.RowStore`.
"""

from __future__ import annotations

import random
from array import array
from bisect import bisect_right
from itertools import accumulate, count, islice
from typing import TYPE_CHECKING

from stl.jobs.errors import DataError
from stl.jobs.ml.sources import RowStore

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from pathlib import Path

    from stl.jobs.ml.examples import Example

def seeded(*parts: object) -> random.Random:
    # Seeding with a str hashes it with SHA-512: stable across processes, unlike hash().
    return random.Random(":".join(str(part) for part in ("stl", *parts)))


def _chosen_indices(n: int, k: int, seed: int) -> list[int]:
    if k >= n:
        return list(range(n))
    return sorted(seeded("k-shot", seed).sample(range(n), k))


def k_shot(examples: Sequence[Example], k: int, seed: int) -> list[Example]:
    """k examples drawn without replacement (all of them when k >= len), kept in source order."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return [examples[i] for i in _chosen_indices(len(examples), k, seed)]

def _indexed_tasks(store: RowStore, tasks: Iterable[str]) -> dict[str, array[int]]:
    names = list(dict.fromkeys(tasks))  # keep the caller's order, drop repeats
    if not names:
        raise DataError("no tasks given")
    keys = store.index(names)
    empty = [task for task in names if not keys[task]]
    if empty:
        raise DataError(f"task(s) {', '.join(empty)} have no examples in {store.source}")
    return keys


def few_shot_examples(
    source: str,
    tasks: Iterable[str],
    k: int,
    seed: int,
    *,
    holdout: int = 0,
    cache_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Example]:
    """k_shot() of each task's examples after its first `holdout` (the ones eval stages score), read by
    index so a large task is never held in memory.

    Gives the same examples as `k_shot(list(read_examples(source, [task]))[holdout:], k, seed)` per task.
    With `cache_dir`, a JSONL file's row index is cached there (see `RowStore.index`).
    """
    if k <= 0:
        raise DataError(f"few-shot fine-tuning needs shots > 0, got {k}")
    store = RowStore(source, cache_dir=cache_dir, log=log)
    chosen: list[Example] = []
    for task, keys in _indexed_tasks(store, tasks).items():
        pool = keys[holdout:]
        if len(pool) < k:
            raise DataError(few_shot_shortfall(task, rows=len(keys), holdout=holdout, shots=k))
        chosen.extend(store.rows([pool[i] for i in _chosen_indices(len(pool), k, seed)]))
    return chosen


def few_shot_shortfall(task: str, *, rows: int, holdout: int, shots: int) -> str:
    """Why `shots` examples of `task` cannot be drawn apart from its eval examples, and what to change."""
    held = min(rows, holdout)
    if rows - shots >= 1:
        fix = f"lower eval.max_examples to {rows - shots} or less, or lower shots"
    else:  # even one eval example leaves too few
        fix = f"lower shots below {rows}, or leave the task out of few-shot runs"
    return (f'task "{task}" has {rows} rows; the first {held} are its eval examples (eval.max_examples: {holdout}), '
            f"which leaves {rows - held} to draw shots: {shots} from; {fix}")


def _reservoir(keys: array[int], cap: int, rng: random.Random) -> array[int]:
    if len(keys) <= cap:
        return keys
    pool = keys[:cap]
    for seen, key in enumerate(islice(keys, cap, None), start=cap):
        slot = rng.randrange(seen + 1)
        if slot < cap:
            pool[slot] = key
    return pool


class Mixture:
    """Examples-proportional mixing of tasks with a per-task cap (T5/T0 convention), streamed.

    How it streams (memory stays flat as the data grows):
    1. One pass over the source builds, per task, the keys (byte offsets / row numbers) of its rows,
       thinned to at most `cap` by reservoir sampling: 8 bytes per row, never the text. With
       `cache_dir`, a JSONL file's offsets are kept there and later mixtures skip the pass.
    2. Each draw picks a task with probability min(n_task, cap) / sum(min(n, cap)), then takes that
       task's next key from a per-epoch shuffle of its pool, and reads that one row.
    `stream(start)` skips the first `start` draws without reading them (only random numbers are
    replayed), so a resumed training run continues exactly where it stopped.
    """

    def __init__(
        self,
        source: str,
        tasks: Iterable[str],
        *,
        cap: int,
        seed: int,
        cache_dir: Path | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if cap <= 0:
            raise DataError(f"mixture cap must be positive, got {cap}")
        self._store = RowStore(source, cache_dir=cache_dir, log=log)
        self._seed = seed
        self._pools = {
            task: _reservoir(keys, cap, seeded("pool", seed, task))
            for task, keys in _indexed_tasks(self._store, tasks).items()
        }

    @property
    def sizes(self) -> dict[str, int]:
        """Examples each task can contribute (its count, capped); the mixing rates are proportional."""
        return {task: len(pool) for task, pool in self._pools.items()}

    def stream(self, start: int = 0) -> Iterator[Example]:
        """The endless, deterministic stream of draws, from draw number `start` on."""
        return self._store.rows(islice(_mixture_keys(self._pools, self._seed), start, None))


def _mixture_keys(pools: dict[str, array[int]], seed: int) -> Iterator[int]:
    names = list(pools)
    cumulative = list(accumulate(len(pools[task]) for task in names))
    total = cumulative[-1]
    chooser = seeded("mixture", seed)
    orders: dict[str, array[int]] = {}
    positions = dict.fromkeys(names, 0)
    epochs = dict.fromkeys(names, -1)
    while True:
        task = names[bisect_right(cumulative, chooser.randrange(total))]
        if task not in orders or positions[task] == len(orders[task]):
            epochs[task] += 1
            order = array("q", pools[task])
            seeded("epoch", seed, task, epochs[task]).shuffle(order)
            orders[task] = order
            positions[task] = 0
        yield orders[task][positions[task]]
        positions[task] += 1


def cycle_shuffled(examples: Sequence[Example], seed: int, start: int = 0) -> Iterator[Example]:
    """`examples` over and over, reshuffled each epoch; `start` skips that many draws."""
    if not examples:
        raise DataError("no examples to train on")
    first_epoch, offset = divmod(start, len(examples))
    for epoch in count(first_epoch):
        order = list(range(len(examples)))
        seeded("cycle", seed, epoch).shuffle(order)
        for position in order[offset:]:
            yield examples[position]
        offset = 0
    raise AssertionError("unreachable")  # pragma: no cover  (count() never ends)


def length_grouped_batches(
    stream_from: Callable[[int], Iterator[Example]],
    *,
    batch_size: int,
    seed: int,
    length: Callable[[Example], int],
    start_batch: int = 0,
    window_batches: int = 50,
) -> Iterator[list[Example]]:
    """Batches of similar-length examples, to keep dynamic padding small.

    The stream is cut into windows of `window_batches * batch_size` examples; each window is sorted by
    `length` (ties by position), cut into batches, and the batches are shuffled. Batch number b depends
    only on the seed and the data, so `start_batch` resumes exactly: `stream_from(n)` must return the
    stream with its first n examples skipped.
    """
    window_size = window_batches * batch_size
    window, skip = divmod(start_batch, window_batches)
    stream = stream_from(window * window_size)
    for window_number in count(window):
        examples = list(islice(stream, window_size))
        if len(examples) < window_size:
            raise DataError("the training stream ended early")  # streams given here are endless
        order = sorted(range(window_size), key=lambda i: (length(examples[i]), i))
        batches = [
            [examples[i] for i in order[first : first + batch_size]] for first in range(0, window_size, batch_size)
        ]
        seeded("batches", seed, window_number).shuffle(batches)
        yield from batches[skip:]
        skip = 0
    raise AssertionError("unreachable")  # pragma: no cover
