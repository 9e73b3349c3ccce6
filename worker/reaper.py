"""What a worker does now and then besides its own stage: requeue stages orphaned by dead horses and workers,
and jobs a dead worker took off a queue before RQ recorded them."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import redis

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.queue.recovery import find_dropped_jobs, reap_orphans, requeue_orphan, worker_is_dead

if TYPE_CHECKING:
    import logging

    from stl.jobs.settings import Settings

REAP_EVERY_S = 2.0  # a live worker finds a dead local horse within this; the check is a few reads
# Looking for jobs taken off a queue by a worker that died reads every live run: not at every reap, but
# when a worker starts, when it sees another die, and every ten minutes.
DROPPED_SCAN_EVERY_S = 600.0
DROPPED_CONFIRM_S = 10.0  # a job in the hands of a live worker is recorded as started long before this


class Reaper:
    def __init__(self, connection: redis.Redis, settings: Settings, *, worker_name: str,
                 log: logging.Logger) -> None:
        self.connection, self.settings, self.worker_name, self.log = connection, settings, worker_name, log
        self._last_reap = 0.0
        self._last_dropped_scan = -DROPPED_SCAN_EVERY_S  # the first reap looks
        self._dropped: dict[str, float] = {}  # stage id -> when first seen in no queue

    def reap_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_reap < REAP_EVERY_S:
            return
        self._last_reap = now
        try:
            self._reap(now)
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # the dequeue loop waits for Redis
        except Exception:
            # A record the reaper cannot read must not stop the worker: RQ would end its loop.
            self.log.exception("Worker %s: looking for orphaned stages failed; trying again later", self.worker_name)

    def _reap(self, now: float) -> None:
        for stage_id in reap_orphans(self.connection, self.settings):
            self.log.warning("Worker %s: stage %s was orphaned; requeued at the head of its queue",
                             self.worker_name, stage_id)
        # Jobs are dropped only by a worker that dies: look when one has, when starting, and now and then.
        if self._forget_dead_workers() or now - self._last_dropped_scan >= DROPPED_SCAN_EVERY_S or (
                self._dropped and now - self._last_dropped_scan >= DROPPED_CONFIRM_S):
            self._last_dropped_scan = now
            self._requeue_dropped(now)

    def _forget_dead_workers(self) -> bool:
        """Take workers that died without a word (kill -9, lost machine) off the list; True if any."""
        names = sorted(text(n) for n in self.connection.smembers(keys.WORKERS) if text(n) != self.worker_name)
        if not names:
            return False
        pipe = self.connection.pipeline(transaction=False)
        for name in names:
            pipe.exists(keys.worker(name))
        dead = [n for n, alive in zip(names, pipe.execute(), strict=True) if not alive or worker_is_dead(n)]
        if dead:
            self.connection.srem(keys.WORKERS, *dead)
            self.log.warning("Worker %s: worker(s) %s died; looking for the jobs they held", self.worker_name,
                             ", ".join(dead))
        return bool(dead)

    def _requeue_dropped(self, now: float) -> None:
        """Jobs a dead worker took off a queue before RQ recorded them: requeued when seen twice."""
        found = set(find_dropped_jobs(self.connection))
        self._dropped = {sid: self._dropped.get(sid, now) for sid in found}
        for stage_id, since in list(self._dropped.items()):
            if now - since < DROPPED_CONFIRM_S:
                continue
            del self._dropped[stage_id]
            if requeue_orphan(self.connection, self.settings, stage_id, horse_dead=True, dropped=True,
                              reason="its worker died after taking it off the queue"):
                self.log.warning("Worker %s: stage %s was taken off its queue by a worker that died; requeued",
                                 self.worker_name, stage_id)
