"""Admission by device memory, against Redis: which stage may start on a shared device now, and the memory
records that make the next guess better.

The worker (several slots on one GPU, or the fake device of STL_FAULT_INJECT) asks `AdmissionGate.take` instead
of popping a queue: it looks at the head job of the first non-empty queue in fair-share order, without taking
it, and takes it only if stl.jobs.queue.admission admits it; otherwise the stage waits at the head, its reason on
its record (`waiting_reason`) and on the worker's (`waiting`). The head is not skipped for a smaller stage
behind it: fair share decides who goes next, memory only when.

Slots of one device admit one at a time (a short Redis lock) and each admitted stage's estimate is registered
in keys.device_reserved(device) until its stage ends, so two slots never count the same free memory twice.
In the horse: `cap_horse_memory` caps the process at its budget, `record_horse_peak` stores what it reached.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

import redis

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.queue.admission import Admission, DeviceMemory, Reservation, decide_admission
from stl.jobs.states import RunStatus

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from rq import Queue
    from rq.job import Job

    from stl.jobs.specs import StageSpec

LOCK_TTL_MS = 5000  # admission takes a few reads; a slot that dies holding the lock blocks its device this long
LOCK_WAIT_S = 2.0
# A reservation whose stage is not running this long after its admission belongs to a take that never started
# (its horse failed before marking it running): it no longer holds memory.
START_GRACE_S = 120.0
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Take job ARGV[1] off the queue only while it is still at its head (another worker may have taken it since it
# was admitted), into RQ's intermediate queue as RQ's own LMOVE does. KEYS: the queue, its intermediate queue.
_TAKE_IF_HEAD = """
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then return redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') end
return false
"""
# Keep the largest value seen for a field: a memory key's peak, a calibration key's ratio. KEYS: the hash.
# ARGV: field, value.
_KEEP_MAX = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0
if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return 1 end
return 0
"""


def recorded_peak(conn: redis.Redis, spec: StageSpec) -> int | None:
    from stl.jobs.ml.memory_estimate import memory_key

    value = text(conn.hget(keys.MEMORY_PEAKS, memory_key(spec)))
    return int(value) if value.isdigit() else None


def formula_correction(conn: redis.Redis, spec: StageSpec) -> float | None:
    """The largest ratio of recorded peak to formula of the stage's model and kind; None before the first."""
    from stl.jobs.ml.memory_estimate import calibration_key

    try:
        ratio = float(text(conn.hget(keys.MEMORY_CALIBRATION, calibration_key(spec))))
    except ValueError:
        return None
    return ratio if ratio > 0 and math.isfinite(ratio) else None


def stage_estimate(conn: redis.Redis, spec: StageSpec) -> int:
    from stl.jobs.ml.memory_estimate import estimate_memory

    recorded = recorded_peak(conn, spec)
    correction = None if recorded else formula_correction(conn, spec)
    return estimate_memory(spec, recorded=recorded, correction=correction).bytes


def record_peak(conn: redis.Redis, stage_id: str, spec: StageSpec, peak_bytes: int) -> None:
    """A stage's peak on its record (`peak_memory_bytes`); if the largest of its memory key, in MEMORY_PEAKS; and
    its ratio to the formula, if the largest of its model and kind, in MEMORY_CALIBRATION."""
    from stl.jobs.ml.memory_estimate import calibration_key, estimate_memory, memory_key

    conn.hset(keys.stage(stage_id), "peak_memory_bytes", peak_bytes)
    conn.eval(_KEEP_MAX, 1, keys.MEMORY_PEAKS, memory_key(spec), peak_bytes)
    formula = estimate_memory(spec, recorded=None).bytes
    if formula > 0 and peak_bytes > 0:
        conn.eval(_KEEP_MAX, 1, keys.MEMORY_CALIBRATION, calibration_key(spec), repr(peak_bytes / formula))


class AdmissionGate:
    """One worker's admission to its device; `device` names the device across workers ("<host>:gpu0")."""

    def __init__(self, conn: redis.Redis, *, device: str, memory: DeviceMemory, worker_name: str,
                 log: Callable[[str], None]) -> None:
        self.conn = conn
        self.device = device
        self.memory = memory
        self.worker_name = worker_name
        self.log = log
        self.host = socket.gethostname()
        self.waiting = ""  # "stage <id> needs 9.0 GiB, 6.1 GiB free" while the head stage waits; "" otherwise
        self._waiting_stage = ""
        self.queues_empty = False  # whether the last `take` found no job in any queue

    def take(self, queues: Sequence[Queue], fetch: Callable[[str, str], tuple[Job, Queue] | None]
             ) -> tuple[Job, Queue] | None:
        """The head job of the first non-empty queue, taken off it if its stage fits on the device now; None
        if every queue is empty, the stage must wait (see `waiting`), or another worker took it first.
        `fetch(queue key, job id)` turns a taken job id into RQ's (job, queue), as RQ's dequeue does."""
        head = _head(self.conn, queues)
        self.queues_empty = head is None
        if head is None:
            self._wait_for("", "")
            return None
        queue, job_id = head
        from stl.jobs.queue.queueing import stage_id_for

        stage_id = stage_id_for(job_id)
        with self._device_lock() as locked:
            if not locked:
                return None  # another slot is admitting; the next poll tries again
            decision = self._decide(stage_id)
            if not decision.admitted:
                self._wait_for(stage_id, f"stage {stage_id} {decision.reason}")
                return None
            if not self.conn.eval(_TAKE_IF_HEAD, 2, queue.key, queue.intermediate_queue_key, job_id):
                return None  # taken by another worker since it was looked at
            self._reserve(stage_id, decision)
        self._wait_for("", "")
        self.log(f"stage {stage_id} admitted to {self.device}: {decision.reason}")
        return fetch(queue.key, job_id)

    def release(self, stage_id: str) -> None:
        """The stage ended on this worker (however): its memory is no longer promised to it."""
        with contextlib.suppress(redis.RedisError):
            entry = _reservation(self.conn.hget(keys.device_reserved(self.device), stage_id))
            if entry is not None and entry.get("worker") == self.worker_name:
                self.conn.hdel(keys.device_reserved(self.device), stage_id)
            self.conn.hset(keys.stage(stage_id), "memory_budget_bytes", "")

    # --- inside the lock ------------------------------------------------------------------------

    def _decide(self, stage_id: str) -> Admission:
        from stl.jobs.specs import StageSpec

        raw = self.conn.hget(keys.stage(stage_id), "spec")
        try:
            estimate = stage_estimate(self.conn, StageSpec.model_validate_json(raw or b""))
        except ValueError:
            estimate = 0  # no stage or an unreadable spec: its horse fails it at once, using no device memory
        _, free = self.memory.total_and_free()
        return decide_admission(estimate, free_bytes=free, others=self._others(exclude=stage_id))

    def _others(self, *, exclude: str) -> list[Reservation]:
        """The stages admitted to this device and still there; stale reservations are removed on the way."""
        from stl.jobs.specs import StageSpec

        reserved_key = keys.device_reserved(self.device)
        entries = {text(k): _reservation(v) for k, v in self.conn.hgetall(reserved_key).items()}
        running = {text(s) for s in self.conn.smembers(keys.device_stages(self.device))}
        ids = sorted((set(entries) | running) - {exclude})
        if not ids:
            return []
        pipe = self.conn.pipeline(transaction=False)
        for sid in ids:
            pipe.hmget(keys.stage(sid), "status", "worker", "spec")
            entry = entries.get(sid)
            # Whether the worker that reserved it lives (a stage without a reservation has none to check).
            if entry is not None:
                pipe.exists(keys.worker(str(entry.get("worker", ""))))
            else:
                pipe.echo(1)
        replies = pipe.execute()
        now, others, stale = time.time(), [], []
        for index, sid in enumerate(ids):
            (status, holder, raw_spec), worker_alive = replies[2 * index], replies[2 * index + 1]
            entry, is_running = entries.get(sid), text(status) == RunStatus.running.value
            if entry is not None and (not worker_alive or (
                    not is_running and now - float(entry.get("at") or 0) > START_GRACE_S)):
                stale.append(sid)
                continue
            if entry is not None and isinstance(entry.get("bytes"), int):
                estimate = int(entry["bytes"])
            else:  # on the device without this gate's admission (a slot of another version): estimate it now
                try:
                    estimate = stage_estimate(self.conn, StageSpec.model_validate_json(raw_spec or b""))
                except ValueError:
                    continue
            others.append(Reservation(sid, estimate, self._used_by(text(holder)) if is_running else None))
        if stale:
            self.conn.hdel(reserved_key, *stale)
        return others

    def _used_by(self, holder: str) -> int | None:
        """What the horse `<host>:<pid>` holds on the device now, if this host's device can tell."""
        host, _, pid = holder.rpartition(":")
        if host != self.host or not pid.isdigit():
            return None
        return self.memory.used_by_process(int(pid))

    def _reserve(self, stage_id: str, decision: Admission) -> None:
        entry = json.dumps({"bytes": decision.estimate_bytes, "at": time.time(), "worker": self.worker_name})
        pipe = self.conn.pipeline(transaction=False)
        pipe.hset(keys.device_reserved(self.device), stage_id, entry)
        # A stage alone on the device is not capped: like a stage of a one-slot worker, it may use the whole device.
        pipe.hset(keys.stage(stage_id), mapping={"memory_budget_bytes": "" if decision.alone else decision.need_bytes,
                                                 "memory_estimate_bytes": decision.estimate_bytes,
                                                 "waiting_reason": ""})
        pipe.execute()

    def _wait_for(self, stage_id: str, reason: str) -> None:
        """Say on the worker's record and on the stage's why its head stage waits; "" clears both."""
        if reason and reason != self.waiting:
            self.log(f"waiting: {reason}")
        with contextlib.suppress(redis.RedisError):
            if self._waiting_stage and self._waiting_stage != stage_id:
                self.conn.hset(keys.stage(self._waiting_stage), "waiting_reason", "")
            if stage_id:
                self.conn.hset(keys.stage(stage_id), "waiting_reason", reason)
        self.waiting, self._waiting_stage = reason, stage_id

    @contextlib.contextmanager
    def _device_lock(self) -> Iterator[bool]:
        token = uuid.uuid4().hex
        key = keys.device_admission_lock(self.device)
        deadline = time.monotonic() + LOCK_WAIT_S
        locked = bool(self.conn.set(key, token, nx=True, px=LOCK_TTL_MS))
        while not locked and time.monotonic() < deadline:
            time.sleep(0.05)
            locked = bool(self.conn.set(key, token, nx=True, px=LOCK_TTL_MS))
        try:
            yield locked
        finally:
            if locked:
                with contextlib.suppress(redis.RedisError):
                    self.conn.eval(_RELEASE_LOCK, 1, key, token)


def _head(conn: redis.Redis, queues: Sequence[Queue]) -> tuple[Queue, str] | None:
    """The first queue (in the order given) that holds a job, and the id of the job at its head."""
    pipe = conn.pipeline(transaction=False)
    for queue in queues:
        pipe.lindex(queue.key, 0)
    for queue, job_id in zip(queues, pipe.execute(), strict=True):
        if job_id is not None:
            return queue, text(job_id)
    return None


def _reservation(raw: object) -> dict[str, Any] | None:
    try:
        value = json.loads(text(raw))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# --- in the work horse ----------------------------------------------------------------------------


def cap_horse_memory(conn: redis.Redis, stage_id: str, device: str, log: Callable[[str], None]) -> None:
    """Before the model is built: cap this horse's CUDA allocations at the budget its admission gave it (none:
    not admitted by memory, or alone on the device), and start counting its peak from zero."""
    if device != "cuda":
        return
    import torch

    torch.cuda.reset_peak_memory_stats()
    budget = text(conn.hget(keys.stage(stage_id), "memory_budget_bytes"))
    if not budget.isdigit():
        return
    _, total = torch.cuda.mem_get_info()
    fraction = min(int(budget) / total, 1.0)
    torch.cuda.set_per_process_memory_fraction(fraction)
    from stl.jobs.humanize import format_bytes

    log(f"device memory capped at {format_bytes(int(budget))} ({fraction:.0%} of {format_bytes(total)}): other "
        "stages share this GPU")


def record_horse_peak(conn: redis.Redis, stage_id: str, spec: StageSpec, device: str) -> None:
    """After a finished stage on CUDA: its peak allocation, for the next estimate of its memory key."""
    if device != "cuda":
        return
    import torch

    with contextlib.suppress(redis.RedisError):
        record_peak(conn, stage_id, spec, int(torch.cuda.max_memory_allocated()))
