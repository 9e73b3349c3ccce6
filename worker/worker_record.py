"""A worker's record in Redis (`stl:worker:<name>`), which `stl status` shows: written at every heartbeat,
expiring when the worker stops writing it, removed when the worker ends."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import redis

from stl.jobs import keys
from stl.jobs.disk_space import free_space

if TYPE_CHECKING:
    import logging
    from pathlib import Path

    from redis.typing import EncodableT, FieldT

WORKER_RECORD_TTL_S = 120


def write_worker_record(conn: redis.Redis, name: str, fields: dict[str, Any], *, home: Path,
                        state: str | None, log: logging.Logger) -> None:
    """`fields`, the time and the free space of STL_HOME's disk; `state` None keeps the recorded one."""
    record: dict[FieldT, EncodableT] = {"heartbeat": time.time()}
    record.update(fields)
    space = free_space(home)
    if space is not None:
        record["home_free_bytes"], record["home_total_bytes"] = space
    if state is not None:
        record["state"] = state
    try:
        pipe = conn.pipeline(transaction=False)
        pipe.sadd(keys.WORKERS, name)
        pipe.hset(keys.worker(name), mapping=record)
        pipe.expire(keys.worker(name), WORKER_RECORD_TTL_S)
        pipe.execute()
    except (redis.ConnectionError, redis.TimeoutError) as e:
        # What `stl status` shows can wait; the work cannot.
        log.error("Worker %s: could not write its status to Redis (%s)", name, e)


def remove_worker_record(conn: redis.Redis, name: str, *, log: logging.Logger) -> None:
    try:
        pipe = conn.pipeline(transaction=False)
        pipe.srem(keys.WORKERS, name)
        pipe.delete(keys.worker(name))
        pipe.execute()
    except redis.RedisError as e:
        log.error("Worker %s: could not remove its record from Redis (%s); it expires", name, e)
