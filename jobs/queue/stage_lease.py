"""The lease that lets exactly one work horse work on a stage, kept alive by a heartbeat thread.

Taking the lease also takes the stage's fencing token (stl.jobs.queue.fence): every write of the stage goes
through `StageLease.fence`, so a horse another one took over from cannot write over it.
"""

from __future__ import annotations

import contextlib
import threading
import time

import redis

from stl.jobs import keys
from stl.jobs.queue.fence import StageFence

HEARTBEAT_EVERY_S = 3.0
LEASE_TTL_S = 30
# Taking the lease, joining the running set and counting one more take of the stage (its generation, the
# horse's fencing token: stl.jobs.queue.fence) are one step: a horse killed in between would leave a stage that no
# reaper looks at. KEYS: the lease, the running set, the generation. Returns the token, or 0 (held).
_ACQUIRE_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('SADD', KEYS[2], ARGV[3])
  return redis.call('INCR', KEYS[3])
end
return 0
"""
# Renew the lease only while no other horse took the stage since (its generation is past our token) and we
# still hold it. After a Redis restart it may have expired, a reaper may have taken the stage out of the
# running set, and the take itself may be lost (the generation below our token): all are put back. KEYS: the
# lease, the running set, the generation, the stage hash. ARGV: holder, TTL, stage id, token, now.
_RENEW_LEASE = """
local generation, token = tonumber(redis.call('GET', KEYS[3]) or '0') or 0, tonumber(ARGV[4])
if generation > token then return 0 end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
elseif not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
else
  return 0
end
if generation < token then redis.call('SET', KEYS[3], token) end
redis.call('HSET', KEYS[4], 'heartbeat', ARGV[5])
return 1
"""
# Give the lease up only if it is ours, and ours to give: a stale horse leaves a newer one's lease alone.
_RELEASE_LEASE = """
local generation = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if redis.call('GET', KEYS[1]) == ARGV[1] and generation <= tonumber(ARGV[2]) then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class StageLease:
    """Exactly one process works on a stage: the lease is held and refreshed by a heartbeat, and every write
    of the stage is fenced with the token its take got (`fence`)."""

    def __init__(self, conn: redis.Redis, stage_id: str, holder: str) -> None:
        self.conn = conn
        self.stage_id = stage_id
        self.holder = holder
        self.key = keys.stage_lease(stage_id)
        self.fence = StageFence(conn, stage_id, 0)  # the real token once acquired
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def acquire(self) -> bool:
        token = int(self.conn.eval(_ACQUIRE_LEASE, 3, self.key, keys.RUNNING_STAGES, self.fence.key, self.holder,
                                   LEASE_TTL_S, self.stage_id))
        if token:
            self.fence = StageFence(self.conn, self.stage_id, token)
        return bool(token)

    def taken_over(self) -> bool:
        """Whether another horse took the stage since this one did (Redis away: not known to be)."""
        if self.lost:
            return True
        try:
            self.lost = not self.fence.is_current()
        except redis.RedisError:
            return False
        return self.lost

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_EVERY_S):
                try:
                    if not self.conn.eval(_RENEW_LEASE, 4, self.key, keys.RUNNING_STAGES, self.fence.key,
                                          keys.stage(self.stage_id), self.holder, LEASE_TTL_S, self.stage_id,
                                          self.fence.token, time.time()):
                        # Someone else holds or took the stage: stop without touching its records.
                        self.lost = True
                        return
                except redis.RedisError:
                    pass  # Redis is away; training goes on and the lease is renewed when it is back
        self._thread = threading.Thread(target=beat, name="stl-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            self.conn.eval(_RELEASE_LEASE, 2, self.key, self.fence.key, self.holder, self.fence.token)
