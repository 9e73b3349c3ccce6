"""Fair share: the next run comes from the user who used the least GPU time recently."""

from __future__ import annotations

import functools
import math
import time
from typing import TYPE_CHECKING

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.queue.devices import DEVICE_ACCOUNTED_AT, DEVICE_SECONDS, running_share
from stl.jobs.queue.records import answers_or_report, read_or_report
from stl.jobs.states import Priority, RunStatus

if TYPE_CHECKING:
    import redis

# GPU seconds used an hour ago count half as much as seconds used now.
HALF_LIFE_S = 3600.0

_CHARGE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local value, stamp = 0, tonumber(ARGV[3])
local sep = raw and string.find(raw, '@')
-- A value stl did not write ("garbage", "nan@1") counts as no usage, and this charge writes a good one.
local v, s = sep and tonumber(string.sub(raw, 1, sep - 1)), sep and tonumber(string.sub(raw, sep + 1))
if v and s and v == v and s == s and v < math.huge and s < math.huge then value, stamp = v, s end
local now = tonumber(ARGV[3])
local decayed = value * math.pow(0.5, (now - stamp) / tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], ARGV[1], tostring(decayed + tonumber(ARGV[2])) .. '@' .. ARGV[3])
return tostring(decayed + tonumber(ARGV[2]))
"""


def charge_usage(conn: redis.Redis, user: str, seconds: float, *, now: float | None = None) -> float:
    """Add GPU seconds to a user's decayed usage, atomically."""
    stamp = time.time() if now is None else now
    result = conn.eval(_CHARGE, 1, keys.USAGE, user, f"{max(seconds, 0.0):.6f}", f"{stamp:.6f}",
                       str(HALF_LIFE_S))
    return float(result)


def decayed_usage(raw: str | bytes | None, now: float) -> float:
    """Seconds of GPU time as of `now`, from "value@timestamp"; ValueError for anything else."""
    if not raw:
        return 0.0
    value, _, stamp = text(raw).partition("@")
    decayed = float(value) * math.pow(0.5, (now - float(stamp)) / HALF_LIFE_S)
    if not math.isfinite(decayed) or decayed < 0:
        raise ValueError(f"{text(raw)[:40]!r} is not seconds@timestamp")
    return decayed


def users_by_usage(conn: redis.Redis, *, now: float | None = None) -> list[tuple[str, float]]:
    """Every user who ever queued, least recent GPU time first (ties by name).

    A stage is charged to its user when it ends; until then its share of the device so far (to its last
    heartbeat, so a stage whose worker died stops counting; stl.jobs.queue.devices) is added here, so that
    with several GPUs a user whose stage has held one for hours does not also come first for the next.
    """
    stamp = time.time() if now is None else now
    pipe = conn.pipeline(transaction=False)
    pipe.smembers(keys.USERS)
    pipe.hgetall(keys.USAGE)
    pipe.smembers(keys.RUNNING_STAGES)
    # A damaged record (reported) must not stop the worker: its users count as having used no GPU time.
    answers = answers_or_report(pipe, [keys.USERS, keys.USAGE, keys.RUNNING_STAGES], None)
    users_raw, usage_raw, running_raw = (answer or type_() for answer, type_ in zip(answers, (set, dict, set),
                                                                                        strict=True))
    usage = {text(k): read_or_report(keys.USAGE, f"field {text(k)} is not what stl writes",
                                     functools.partial(decayed_usage, v, stamp), 0.0, then="taken as no GPU time")
             for k, v in usage_raw.items()}
    for user, seconds in _running_seconds(conn, sorted(text(s) for s in running_raw), stamp):
        usage[user] = usage.get(user, 0.0) + seconds
    users = [text(u) for u in users_raw]
    return sorted(((u, usage.get(u, 0.0)) for u in users), key=lambda item: (item[1], item[0]))


def _running_seconds(conn: redis.Redis, stage_ids: list[str], now: float) -> list[tuple[str, float]]:
    """(user, seconds run so far) of each running stage."""
    if not stage_ids:
        return []
    pipe = conn.pipeline(transaction=False)
    for stage_id in stage_ids:
        pipe.hmget(keys.stage(stage_id), "user", "status", "started_at", "heartbeat", DEVICE_SECONDS,
                   DEVICE_ACCOUNTED_AT)
    found = []
    nothing = (None,) * 6
    for user, status, started, heartbeat, device_seconds, accounted_at in answers_or_report(
            pipe, [keys.stage(s) for s in stage_ids], nothing):
        if not user or text(status) != RunStatus.running.value or not started:
            continue
        try:
            start = float(started)
            last = min(now, float(heartbeat) if heartbeat else start)
        except ValueError:
            continue
        # Its share of the device where it keeps an account (stl.jobs.queue.devices), else its wall time.
        share = running_share(device_seconds, accounted_at, last) if accounted_at else None
        found.append((text(user), max(0.0, last - start) if share is None else share))
    return found


def queue_order(conn: redis.Redis) -> list[str]:
    """RQ queue names in the order a worker should look at them."""
    return [keys.queue_name(user, priority.value) for user, _ in users_by_usage(conn) for priority in Priority]
