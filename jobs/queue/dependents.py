"""Stages whose parent has finished but which RQ left out of their queue: enqueued at the worker's next poll.

When a stage finishes, RQ marks its dependents ready (`rq:ready:<queue>`, status `ready_to_enqueue`) and then
enqueues them under an optimistic lock on that registry. If another worker commits to the same registry at
that moment (two slots or two GPUs finishing stages together), RQ skips the job "for now" and leaves it to its
maintenance pass, up to ten minutes later; a `--burst` worker may have quit by then. Seen with `--slots 2`:
2 of 5 runs of bench/bench_slots.py each left one eval stage of its 16-stage grid behind. RQ's `enqueue_jobs`
is safe to call from any number of workers at once: each job is enqueued exactly once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    import logging
    from collections.abc import Sequence

    from rq import Queue
    from rq.job import Job


def enqueue_ready_dependents(conn: redis.Redis, queues: Sequence[Queue], *, log: logging.Logger,
                             worker_name: str) -> list[Job]:
    """Enqueue what `queues`' ready registries still hold: one pipelined round trip when they hold nothing.
    Redis being unreachable is raised (the worker's loop waits for it); anything else is logged."""
    registries = [queue.ready_job_registry for queue in queues]
    if not registries:
        return []
    pipe = conn.pipeline(transaction=False)
    for registry in registries:
        pipe.zcard(registry.key)
    enqueued: list[Job] = []
    for registry, count in zip(registries, pipe.execute(), strict=True):
        if not count:
            continue
        try:
            enqueued += registry.cleanup()
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except Exception:  # a job RQ cannot read back must not stop the worker; RQ's maintenance tries again
            log.exception("Worker %s: enqueueing the ready stages of %s failed; trying again at the next poll",
                          worker_name, registry.key)
    return enqueued
