"""Fair share: the next run comes from the user who used the least GPU time recently."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from jobs import keys
from jobs.codec import text
from jobs.states import Priority, RunStatus

if TYPE_CHECKING:
    import redis

# GPU seconds used an hour ago count half as much as seconds used now.
HALF_LIFE_S = 3600.0

_CHARGE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local value, stamp = 0, tonumber(ARGV[3])
if raw then
  local sep = string.find(raw, '@')
  value = tonumber(string.sub(raw, 1, sep - 1))
  stamp = tonumber(string.sub(raw, sep + 1))
end
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
    if not raw:
        return 0.0
    value, _, stamp = text(raw).partition("@")
    return float(value) * math.pow(0.5, (now - float(stamp)) / HALF_LIFE_S)


def users_by_usage(conn: redis.Redis, *, now: float | None = None) -> list[tuple[str, float]]:
    """Every user who ever queued, least recent GPU time first (ties by name).

    A stage is charged to its user when it ends; until then the seconds it has run so far (to its last
    heartbeat, so a stage whose worker died stops counting) are added here, so that with several GPUs a
    user whose stage has held one for hours does not also come first for the next.
    """
    stamp = time.time() if now is None else now
    pipe = conn.pipeline(transaction=False)
    pipe.smembers(keys.USERS)
    pipe.hgetall(keys.USAGE)
    pipe.smembers(keys.RUNNING_STAGES)
    users_raw, usage_raw, running_raw = pipe.execute()
    usage = {text(k): decayed_usage(v, stamp) for k, v in usage_raw.items()}
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
        pipe.hmget(keys.stage(stage_id), "user", "status", "started_at", "heartbeat")
    found = []
    for user, status, started, heartbeat in pipe.execute():
        if not user or text(status) != RunStatus.running.value or not started:
            continue
        try:
            start = float(started)
            last = float(heartbeat) if heartbeat else start
        except ValueError:
            continue
        found.append((text(user), max(0.0, min(now, last) - start)))
    return found


def queue_order(conn: redis.Redis) -> list[str]:
    """RQ queue names in the order a worker should look at them."""
    return [keys.queue_name(user, priority.value) for user, _ in users_by_usage(conn) for priority in Priority]
