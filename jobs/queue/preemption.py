"""Preemption with a bounded wait: a light user's stage does not wait hours behind a heavy user's long one.

While a worker's horse runs a training stage of user H, the worker checks (every monitor tick, 5 s) whether
a stage of a user L with less recent GPU time waits, with no idle worker to take it. If H's stage has run
STL_PREEMPT_AFTER seconds since it last started, the worker sets the stage's `preempt` flag: training
checkpoints and the stage goes back to the head of H's queue (the path SIGTERM uses), and fair share gives
the freed worker L's stage next. A stage that restarts has its `started_at` set anew, so it cannot be
preempted again before it has run that long again. Evaluations are short and never preempted.

`choose_preemption` is the rule, pure; `preempt_if_due` reads Redis (two pipelined round trips, two more
for fair-share order when someone could be preempted) and sets the flag on the worker's own stage only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from rq import Queue

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.queue.fairshare import users_by_usage
from stl.jobs.states import Priority, RunStatus, StageKind

if TYPE_CHECKING:
    from collections.abc import Iterable

# A worker record says "idle" this recently, or it does not count as idle (its worker may be gone). An idle
# worker writes its record every second, while it waits for work.
IDLE_WORKER_FRESH_S = 15.0
# Set the flag only on the run of the stage that was read: not on one that restarted (or ended) since.
_SET_PREEMPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'started_at') or '') ~= tonumber(ARGV[1]) then return 0 end
local flag = redis.call('HGET', KEYS[1], 'preempt')
if flag and flag ~= '' then return 0 end
redis.call('HSET', KEYS[1], 'preempt', '1', 'preempted_for', ARGV[2], 'preempted_at', ARGV[3])
return 1
"""


@dataclass(frozen=True)
class RunningStage:
    stage_id: str
    user: str
    kind: str
    started_at: float  # when it last started (a preempted stage that resumed: when it resumed)
    yielding: bool  # its preempt flag is set already: its worker frees up soon


@dataclass(frozen=True)
class Preemption:
    stage_id: str
    user: str  # whose stage yields
    for_user: str  # whose waiting stage the worker takes next
    ran_s: float  # how long the stage has run since it last started


def choose_preemption(running: Iterable[RunningStage], waiting_users: Iterable[str], usage: dict[str, float], *,
                      idle_workers: int, preempt_after_s: float, now: float) -> Preemption | None:
    """The stage to preempt now, or None.

    The user who waits is the one fair share serves next: the waiting user with the least recent GPU time
    (`usage`, seconds; ties by name). A training stage can yield to them if its user has strictly more, and
    it has run `preempt_after_s` since it last started. Of those, the heaviest user's longest-running stage
    yields. Nothing yields while an idle worker could take the waiting stage, nor while a stage is yielding
    already (its worker takes the waiting stage); `preempt_after_s` 0 turns preemption off.
    """
    if preempt_after_s <= 0 or idle_workers > 0:
        return None
    running = list(running)
    if any(stage.yielding for stage in running):
        return None
    waiting = sorted(set(waiting_users), key=lambda user: (usage.get(user, 0.0), user))
    if not waiting:
        return None
    light = waiting[0]
    light_usage = usage.get(light, 0.0)
    candidates = [stage for stage in running
                  if stage.kind != StageKind.eval.value and stage.user != light
                  and usage.get(stage.user, 0.0) > light_usage and now - stage.started_at >= preempt_after_s]
    if not candidates:
        return None
    chosen = max(candidates, key=lambda stage: (usage.get(stage.user, 0.0), now - stage.started_at, stage.stage_id))
    return Preemption(stage_id=chosen.stage_id, user=chosen.user, for_user=light, ran_s=now - chosen.started_at)


@dataclass(frozen=True)
class QueueView:
    """What the rule needs from Redis, less fair-share usage."""

    running: list[RunningStage]
    waiting_users: list[str]  # users with at least one stage in their queues
    idle_workers: int  # other workers, idle and not paused


def read_queue_view(conn: redis.Redis, *, own_worker: str, now: float) -> QueueView:
    """Running stages, users with queued stages and idle workers: two pipelined round trips."""
    pipe = conn.pipeline(transaction=False)
    pipe.smembers(keys.USERS)
    pipe.smembers(keys.RUNNING_STAGES)
    pipe.smembers(keys.WORKERS)
    users_raw, running_raw, workers_raw = pipe.execute()
    users = sorted(text(u) for u in users_raw)
    stage_ids = sorted(text(s) for s in running_raw)
    workers = sorted(name for name in (text(w) for w in workers_raw) if name != own_worker)
    pipe = conn.pipeline(transaction=False)
    for user in users:
        for priority in Priority:
            pipe.llen(Queue.redis_queue_namespace_prefix + keys.queue_name(user, priority.value))
    for stage_id in stage_ids:
        pipe.hmget(keys.stage(stage_id), "user", "kind", "status", "started_at", "preempt")
    for name in workers:
        pipe.hmget(keys.worker(name), "state", "paused", "heartbeat", "waiting")
    answers = pipe.execute(raise_on_error=False)  # a damaged record is left out, not fatal
    lanes = len(Priority)
    lengths = answers[:len(users) * lanes]
    stages = answers[len(lengths):len(lengths) + len(stage_ids)]
    records = answers[len(lengths) + len(stage_ids):]
    waiting = [user for i, user in enumerate(users)
               if any(isinstance(n, int) and n > 0 for n in lengths[i * lanes:(i + 1) * lanes])]
    running = []
    for stage_id, fields in zip(stage_ids, stages, strict=True):
        if not isinstance(fields, list):
            continue
        user, kind, status, started, preempt = (text(f) for f in fields)
        if status != RunStatus.running.value or not user:
            continue
        try:
            started_at = float(started)
        except ValueError:
            continue
        running.append(RunningStage(stage_id=stage_id, user=user, kind=kind, started_at=started_at,
                                    yielding=bool(preempt)))
    idle = 0
    for fields in records:
        if not isinstance(fields, list):
            continue
        state, paused, heartbeat, waiting_for_memory = (text(f) for f in fields)
        try:
            fresh = now - float(heartbeat) <= IDLE_WORKER_FRESH_S
        except ValueError:
            fresh = False
        # A slot waiting for device memory cannot take the waiting stage: yielding may be what frees the room.
        idle += state == "idle" and not paused and not waiting_for_memory and fresh
    return QueueView(running=running, waiting_users=waiting, idle_workers=idle)


def preempt_if_due(conn: redis.Redis, *, own_worker: str, own_stage: str, preempt_after_s: float,
                   now: float | None = None) -> Preemption | None:
    """Preempt this worker's stage if the rule chooses it (each worker acts on its own stage only; the rule
    looks at every running stage, so only the one it chooses yields). Returns what was done, or None."""
    if preempt_after_s <= 0 or not own_stage:
        return None
    stamp = time.time() if now is None else now
    view = read_queue_view(conn, own_worker=own_worker, now=stamp)
    own = next((stage for stage in view.running if stage.stage_id == own_stage), None)
    if (own is None or own.kind == StageKind.eval.value or own.yielding or view.idle_workers
            or stamp - own.started_at < preempt_after_s or not set(view.waiting_users) - {own.user}):
        return None  # nothing the rule could choose this stage for: fair-share order is not read
    usage = dict(users_by_usage(conn, now=stamp))
    chosen = choose_preemption(view.running, view.waiting_users, usage, idle_workers=view.idle_workers,
                               preempt_after_s=preempt_after_s, now=stamp)
    if chosen is None or chosen.stage_id != own_stage:
        return None
    if not conn.eval(_SET_PREEMPT, 1, keys.stage(own_stage), repr(own.started_at), chosen.for_user,
                     f"{stamp:.3f}"):
        return None  # it ended, restarted or was told to yield since it was read
    return chosen


def preempted_line(conn: redis.Redis, stage_id: str, error: Exception, ran_s: float) -> str:
    """The log line of a stage that yields (in its horse): for whom, when a worker preempted it for a waiting
    stage; a SIGTERM's yield names no one."""
    try:
        for_user = text(conn.hget(keys.stage(stage_id), "preempted_for"))
    except redis.RedisError:
        for_user = ""
    if for_user:
        return f"preempted for {for_user}'s stage after {ran_s:.0f} s: {error}; back to the head of the queue"
    return f"preempted: {error}; back to the head of the queue"
