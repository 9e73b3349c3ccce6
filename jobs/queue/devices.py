"""Which stages share a device, and each stage's share of it for fair share.

A worker with several slots (`stl worker --slots N`) runs up to N stages at once on one device. Each slot's
worker adds the stage its horse runs to the device's set (keys.device_stages) before the horse starts and
takes it out once the horse has ended, however it ended. An entry is trusted only while a live worker record
of that device names the stage (its record expires 120 s after its worker died), so a dead worker's entry is
left out, and removed, by the next read.

Fair share charges a stage its share of the device: while it runs, every `dt` of wall time adds
dt / (stages on the device) to the stage's `device_seconds`, from `device_accounted_at` on. With one stage on
the device this is its wall time.
"""

from __future__ import annotations

import contextlib

import redis

from stl.jobs import keys
from stl.jobs.codec import text

DEVICE_SECONDS = "device_seconds"  # stage field: its share of the device so far, this attempt
DEVICE_ACCOUNTED_AT = "device_accounted_at"  # stage field: the wall time `device_seconds` counts up to
DEVICE = "device"  # stage field and worker-record field: "<host>:gpu0", "<host>:cpu"

# Add the stage's share since it was last accounted. KEYS: the stage hash. ARGV: now, stages sharing the
# device, "1" to add only while the stage is running, "1" to end the account (the attempt ended: a later
# accrual finds none). Returns the new device_seconds, or false where the stage keeps no account (an older stl
# started it, or the attempt ended) or is not running.
_ACCRUE = """
local at = tonumber(redis.call('HGET', KEYS[1], 'device_accounted_at') or '')
if not at then return false end
if ARGV[3] == '1' and redis.call('HGET', KEYS[1], 'status') ~= 'running' then return false end
local total = tonumber(redis.call('HGET', KEYS[1], 'device_seconds') or '0') or 0
local now = tonumber(ARGV[1])
if now > at then
  total = total + (now - at) / math.max(tonumber(ARGV[2]), 1)
  redis.call('HSET', KEYS[1], 'device_seconds', string.format('%.17g', total),
             'device_accounted_at', string.format('%.17g', now))
end
if ARGV[4] == '1' then redis.call('HDEL', KEYS[1], 'device_accounted_at') end
return string.format('%.17g', total)
"""


def device_id(host: str, device: str) -> str:
    """The name of a device across the lab: "<host>:gpu0", "<host>:cpu"."""
    return f"{host}:{device}"


def join_device(conn: redis.Redis, device: str, stage_id: str) -> None:
    """The stage runs on `device` now (the worker's record must name it first: see stages_on_device)."""
    pipe = conn.pipeline(transaction=False)
    pipe.sadd(keys.device_stages(device), stage_id)
    pipe.hset(keys.stage(stage_id), DEVICE, device)
    pipe.execute()


def leave_device(conn: redis.Redis, device: str, stage_id: str) -> None:
    conn.srem(keys.device_stages(device), stage_id)


def stages_on_device(conn: redis.Redis, device: str) -> list[str]:
    """The stage ids running on `device` now, sorted: its set, less entries no live worker of the device
    names (a worker that died holding them); those are removed from the set."""
    members = sorted(text(s) for s in conn.smembers(keys.device_stages(device)))
    if not members:
        return []
    names = sorted(text(n) for n in conn.smembers(keys.WORKERS))
    pipe = conn.pipeline(transaction=False)
    for name in names:
        pipe.hmget(keys.worker(name), DEVICE, "stage")
    held = {text(stage) for dev, stage in pipe.execute() if text(dev) == device and stage}
    stale = [s for s in members if s not in held]
    if stale:
        conn.srem(keys.device_stages(device), *stale)
    return [s for s in members if s in held]


def accrue_device_share(conn: redis.Redis, stage_id: str, device: str, now: float, *,
                        settle: bool = False) -> float | None:
    """Add the stage's share of its device since it was last accounted (while it runs; `settle`: whatever
    its status, and end the account); its `device_seconds` now, or None where it keeps no account."""
    sharing = len(stages_on_device(conn, device)) if device else 1
    raw = conn.eval(_ACCRUE, 1, keys.stage(stage_id), f"{now:.6f}", str(max(sharing, 1)),
                    "0" if settle else "1", "1" if settle else "0")
    return float(raw) if raw is not None else None


def settle_device_seconds(conn: redis.Redis, stage_id: str, now: float) -> float | None:
    """At the end of an attempt: the stage's share of its device up to `now` (None: it keeps no account)."""
    with contextlib.suppress(redis.RedisError, ValueError):
        device = text(conn.hget(keys.stage(stage_id), DEVICE))
        return accrue_device_share(conn, stage_id, device, now, settle=True)
    return None


def running_share(device_seconds: str | bytes | None, accounted_at: str | bytes | None, last: float) -> float | None:
    """A running stage's share so far, to its last heartbeat `last`: what is accounted, and the few seconds
    since at the full rate; None where it keeps no account."""
    try:
        accounted, seconds = float(text(accounted_at)), float(text(device_seconds) or 0)
    except ValueError:
        return None
    return seconds + max(0.0, last - accounted)
