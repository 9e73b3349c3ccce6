"""Stages whose parent has finished but which RQ left out of their queue: enqueued at the worker's next poll.

When a stage finishes, RQ marks its dependents ready (`rq:ready:<queue>`, status `ready_to_enqueue`) and then
enqueues them under an optimistic lock on that registry. If another worker commits to the same registry at
that moment (two slots or two GPUs finishing stages together), RQ skips the job "for now" and leaves it to its
maintenance pass, up to ten minutes later; a `--burst` worker may have quit by then. Seen with `--slots 2`:
2 of 8 runs of a 16-stage grid left an eval stage behind (bench/bench_slots.py). RQ's `enqueue_jobs` is safe
to call from any number of workers at once: each job is enqueued exactly once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    import redis
    from rq import Queue
    from rq.job import Job


def enqueue_ready_dependents(conn: redis.Redis, queues: Sequence[Queue]) -> list[Job]:
    """Enqueue what `queues`' ready registries still hold: one pipelined round trip when they hold nothing."""
    registries = [queue.ready_job_registry for queue in queues]
    if not registries:
        return []
    pipe = conn.pipeline(transaction=False)
    for registry in registries:
        pipe.zcard(registry.key)
    enqueued: list[Job] = []
    for registry, count in zip(registries, pipe.execute(), strict=True):
        if count:
            enqueued += registry.cleanup()
    return enqueued
