"""Putting runs on the queue, taking them off, and putting failed ones back.

Runs are stl records; the GPU work is done by stage jobs, which are RQ jobs linked by RQ
dependencies and executed through one registered entry point. A stage shared by several runs
(for example one MTL model serving every shots value) is one RQ job.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from jobs import keys
from jobs.errors import NotFound, PermissionDenied, RedisUnavailable, StlError, UsageError
from jobs.specs import RunSpec, RunStatus, StageKind, StageSpec

if TYPE_CHECKING:
    from collections.abc import Iterable

ENTRY_POINT = "jobs.entry.run_stage"
# RQ's defaults would kill a job after 180 s and drop its record after 500 s.
RESULT_TTL_S = 90 * 86400
FAILURE_TTL_S = 90 * 86400
LIVE = (RunStatus.queued.value, RunStatus.running.value)
ENQUEUE_LOCK_TTL_MS = 60_000


def job_id_for(stage_id: str) -> str:
    return f"stl-{stage_id}"


def stage_id_for(job_id: str) -> str:
    return job_id.removeprefix("stl-")


def make_queue(conn: redis.Redis, user: str, priority: str) -> Queue:
    return Queue(keys.queue_name(user, priority), connection=conn, serializer=JSONSerializer)


@dataclass
class SubmitReport:
    grid: str
    queued: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    stages_created: int = 0
    stages_reused: int = 0


class _EnqueueLock:
    """Serialises enqueuers so that dedupe reads and the write that follows agree."""

    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn
        self.token = uuid.uuid4().hex

    def __enter__(self) -> _EnqueueLock:
        deadline = time.monotonic() + 30
        while not self.conn.set(keys.ENQUEUE_LOCK, self.token, nx=True, px=ENQUEUE_LOCK_TTL_MS):
            if time.monotonic() > deadline:
                raise StlError("another `stl enqueue` has held the queue lock for 30 s; try again")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn.get(keys.ENQUEUE_LOCK) == self.token.encode():
            self.conn.delete(keys.ENQUEUE_LOCK)


def _decode(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def submit_runs(
    conn: redis.Redis,
    runs: list[RunSpec],
    stages: dict[str, StageSpec],
    *,
    user: str,
    priority: str,
    stage_timeout: int,
    requeue: Iterable[str] = (),
) -> SubmitReport:
    """Write runs and the stage jobs they need, in one Redis transaction.

    A run whose identical twin is queued, running or finished is skipped, unless its id is in
    `requeue` (used by retry). Stages already finished are reused; stages queued or running are
    shared; failed or canceled ones are queued again.
    """
    if not runs:
        return SubmitReport(grid="")
    requeue_ids = set(requeue)
    report = SubmitReport(grid=runs[0].grid)
    try:
        with _EnqueueLock(conn):
            for _attempt in range(20):
                try:
                    _submit_once(conn, runs, stages, user=user, priority=priority,
                                 stage_timeout=stage_timeout, requeue_ids=requeue_ids, report=report)
                    return report
                except redis.WatchError:
                    report = SubmitReport(grid=runs[0].grid)
                    continue
            raise StlError("the queue kept changing while enqueueing; try again")
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise RedisUnavailable(f"lost the connection to Redis while enqueueing ({e}); "
                               "nothing was written; try again") from e


def _submit_once(
    conn: redis.Redis,
    runs: list[RunSpec],
    stages: dict[str, StageSpec],
    *,
    user: str,
    priority: str,
    stage_timeout: int,
    requeue_ids: set[str],
    report: SubmitReport,
) -> None:
    run_ids = [run.run_id for run in runs]
    stage_ids = list(stages)
    with conn.pipeline(transaction=True) as pipe:
        pipe.watch(*[keys.stage(s) for s in stage_ids])
        # Reads (immediate, because the pipeline is in WATCH mode) go through a second pipeline.
        reader = conn.pipeline(transaction=False)
        for run_id in run_ids:
            reader.hget(keys.run(run_id), "status")
        for stage_id in stage_ids:
            reader.hmget(keys.stage(stage_id), "status", "metrics")
        answers = reader.execute()
        run_status = {rid: _decode(s) for rid, s in zip(run_ids, answers[: len(run_ids)], strict=True)}
        stage_state: dict[str, tuple[str, str]] = {}
        for sid, (status, metrics) in zip(stage_ids, answers[len(run_ids):], strict=True):
            stage_state[sid] = (_decode(status), _decode(metrics))

        to_write: list[RunSpec] = []
        for run in runs:
            status = run_status[run.run_id]
            if status in (*LIVE, RunStatus.finished.value) and run.run_id not in requeue_ids:
                report.skipped.append(run.run_id)
            else:
                to_write.append(run)
        needed: dict[str, StageSpec] = {}
        for run in to_write:
            for sid in run.stages:
                needed.setdefault(sid, stages[sid])

        queue = make_queue(conn, user, priority)
        now = time.time()
        pipe.multi()
        created: set[str] = set()
        for sid, spec in needed.items():
            status, _metrics = stage_state[sid]
            if status in (RunStatus.finished.value, *LIVE):
                report.stages_reused += 1
                continue
            parent_pending = spec.parent is not None and (
                spec.parent in created or stage_state[spec.parent][0] != RunStatus.finished.value
            )
            _write_stage_job(pipe, queue, sid, spec, user=user, now=now, timeout=stage_timeout,
                             depends_on=job_id_for(spec.parent) if parent_pending and spec.parent else None,
                             replace=bool(status))
            created.add(sid)
            report.stages_created += 1

        for run in to_write:
            _write_run(pipe, run, user=user, priority=priority, now=now, stage_state=stage_state,
                       created=created)
            report.queued.append(run.run_id)
        if to_write:
            pipe.zadd(keys.GRIDS, {runs[0].grid: now}, nx=True)
            pipe.hsetnx(keys.grid(runs[0].grid), "created_at", now)
            pipe.hdel(keys.grid(runs[0].grid), "notified_at", "ended_at")
            pipe.sadd(keys.USERS, user)
        pipe.execute()


def _write_stage_job(
    pipe: Any, queue: Queue, stage_id: str, spec: StageSpec, *, user: str, now: float, timeout: int,
    depends_on: str | None, replace: bool,
) -> None:
    job_id = job_id_for(stage_id)
    if replace:  # a failed or canceled stage: clear RQ's old record of it first
        pipe.delete(Job.key_for(job_id), Job.key_for(job_id) + ":dependencies")
        pipe.zrem(queue.failed_job_registry.key, job_id)
        pipe.zrem(queue.canceled_job_registry.key, job_id)
    job = queue.create_job(
        ENTRY_POINT, args=(stage_id,), job_id=job_id, timeout=timeout, result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S, description=f"{spec.kind.value} {spec.model} {','.join(spec.tasks)[:80]}",
        depends_on=depends_on,
        status=JobStatus.DEFERRED if depends_on else JobStatus.QUEUED,
    )
    if depends_on:
        job.origin = queue.name
        job.register_dependency(pipeline=pipe)
        job.save(pipeline=pipe)
        pipe.sadd(queue.redis_queues_keys, queue.key)
    else:
        queue._enqueue_job(job, pipeline=pipe)  # noqa: SLF001 - enqueue_job would WATCH inside our MULTI
        pipe.sadd(queue.redis_queues_keys, queue.key)
    total = spec.train.max_steps if spec.train else 0
    pipe.hset(keys.stage(stage_id), mapping={
        "id": stage_id, "kind": spec.kind.value, "model": spec.model, "spec": spec.model_dump_json(),
        "status": RunStatus.queued.value, "user": user, "queue": queue.name, "created_at": now,
        "started_at": "", "ended_at": "", "error": "", "step": 0, "total": total, "loss": "",
        "cancel": "", "preempt": "", "heartbeat": "", "worker": "",
    })


def _write_run(
    pipe: Any, run: RunSpec, *, user: str, priority: str, now: float,
    stage_state: dict[str, tuple[str, str]], created: set[str],
) -> None:
    run_id = run.run_id
    finished = [s for s in run.stages if s not in created and stage_state[s][0] == RunStatus.finished.value]
    done = len(finished) == len(run.stages)
    pipe.delete(keys.run_results(run_id))
    pipe.hset(keys.run(run_id), mapping={
        "id": run_id, "grid": run.grid, "user": user, "priority": priority,
        "status": RunStatus.finished.value if done else RunStatus.queued.value,
        "cell": json.dumps(run.cell, sort_keys=True), "stages": json.dumps(list(run.stages)),
        "eval_stages": json.dumps(list(run.eval_stages)), "n_stages": len(run.stages),
        "stages_done": len(finished), "created_at": now, "started_at": now if done else "",
        "ended_at": now if done else "", "error": "",
    })
    for sid in run.stages:
        pipe.sadd(keys.stage_runs(sid), run_id)
    for sid in run.eval_stages:
        if sid in finished and stage_state[sid][1]:
            for metric in json.loads(stage_state[sid][1]):
                pipe.hset(keys.run_results(run_id), metric["task"], json.dumps({**metric, "stage": sid}))
    pipe.zadd(keys.RUNS, {run_id: now})
    pipe.zadd(keys.grid_runs(run.grid), {run_id: now})


# --- cancel and retry -------------------------------------------------------------------------


def runs_of_grid(conn: redis.Redis, grid: str) -> list[str]:
    ids = [_decode(r) for r in conn.zrange(keys.grid_runs(grid), 0, -1)]
    if not ids:
        raise NotFound(f'no grid named "{grid}"; `stl status` lists the grids')
    return ids


def _load_runs(conn: redis.Redis, run_ids: list[str]) -> list[dict[str, str]]:
    pipe = conn.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hgetall(keys.run(run_id))
    records = []
    for run_id, raw in zip(run_ids, pipe.execute(), strict=True):
        if not raw:
            raise NotFound(f'no run with id "{run_id}"; `stl status --json` lists run ids')
        records.append({_decode(k): _decode(v) for k, v in raw.items()})
    return records


def _check_owner(records: list[dict[str, str]], user: str, force: bool, verb: str) -> None:
    foreign = [r["id"] for r in records if r["user"] != user]
    if foreign and not force:
        owners = sorted({r["user"] for r in records if r["user"] != user})
        raise PermissionDenied(f"refusing to {verb} {len(foreign)} run(s) owned by {', '.join(owners)} "
                               f"(e.g. {foreign[0]}); only the owner may, unless you pass --force")


def cancel_runs(conn: redis.Redis, run_ids: list[str], *, user: str, force: bool) -> tuple[list[str], list[str]]:
    """Cancel runs. Returns (canceled, already done). Stages other live runs still need keep going."""
    records = _load_runs(conn, run_ids)
    _check_owner(records, user, force, "cancel")
    canceled: list[str] = []
    already: list[str] = []
    now = time.time()
    for record in records:
        if record["status"] not in LIVE:
            already.append(record["id"])
            continue
        conn.hset(keys.run(record["id"]), mapping={
            "status": RunStatus.canceled.value, "ended_at": now, "error": f"canceled by {user}"})
        canceled.append(record["id"])
        for sid in json.loads(record["stages"]):
            _cancel_stage_if_unneeded(conn, sid, user=user)
    return canceled, already


def _cancel_stage_if_unneeded(conn: redis.Redis, stage_id: str, *, user: str) -> None:
    status = _decode(conn.hget(keys.stage(stage_id), "status"))
    if status not in LIVE:
        return
    others = [_decode(r) for r in conn.smembers(keys.stage_runs(stage_id))]
    pipe = conn.pipeline(transaction=False)
    for run_id in others:
        pipe.hget(keys.run(run_id), "status")
    if any(_decode(s) in LIVE for s in pipe.execute()):
        return
    if status == RunStatus.running.value:
        # The work horse checks this flag between steps and stops within seconds.
        conn.hset(keys.stage(stage_id), "cancel", user or "cancel")
        return
    try:
        job = Job.fetch(job_id_for(stage_id), connection=conn, serializer=JSONSerializer)
        if not job.is_canceled:
            job.cancel()
    except Exception:  # noqa: BLE001 - the RQ record may have expired; the stage record is what counts
        pass
    conn.hset(keys.stage(stage_id), mapping={"status": RunStatus.canceled.value, "ended_at": time.time(),
                                             "error": f"canceled ({user})"})


def cancel_stage_jobs(conn: redis.Redis, run_ids: list[str], *, reason: str) -> None:
    """After runs failed or were canceled, cancel the stages that no live run needs any more."""
    records = _load_runs(conn, run_ids)
    for record in records:
        for sid in json.loads(record["stages"]):
            _cancel_stage_if_unneeded(conn, sid, user=reason)


def load_run_specs(conn: redis.Redis, records: list[dict[str, str]]) -> tuple[list[RunSpec], dict[str, StageSpec]]:
    """Rebuild run and stage specs from their records, for retry."""
    runs = [RunSpec(grid=r["grid"], cell=json.loads(r["cell"]), stages=tuple(json.loads(r["stages"])),
                    eval_stages=tuple(json.loads(r["eval_stages"]))) for r in records]
    stage_ids = sorted({sid for run in runs for sid in run.stages})
    pipe = conn.pipeline(transaction=False)
    for sid in stage_ids:
        pipe.hget(keys.stage(sid), "spec")
    stages: dict[str, StageSpec] = {}
    for sid, raw in zip(stage_ids, pipe.execute(), strict=True):
        if not raw:
            raise NotFound(f"stage {sid} has no record in Redis; enqueue the grid file again instead")
        stages[sid] = StageSpec.model_validate_json(raw)
    return runs, stages


def retry_runs(conn: redis.Redis, run_ids: list[str], *, user: str, force: bool,
               priority: str | None = None) -> tuple[list[str], list[str]]:
    """Queue failed or canceled runs again. Returns (requeued, not retryable)."""
    records = _load_runs(conn, run_ids)
    _check_owner(records, user, force, "retry")
    retryable = [r for r in records if r["status"] in (RunStatus.failed.value, RunStatus.canceled.value)]
    skipped = [r["id"] for r in records if r not in retryable]
    if not retryable:
        return [], skipped
    by_owner: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for record in retryable:
        key = (record["user"], priority or record.get("priority") or "normal", record["grid"])
        by_owner.setdefault(key, []).append(record)
    requeued: list[str] = []
    for (owner, prio, _grid), group in by_owner.items():
        runs, stages = load_run_specs(conn, group)
        timeout = _stage_timeout_of(conn, runs)
        report = submit_runs(conn, runs, stages, user=owner, priority=prio, stage_timeout=timeout,
                             requeue=[r.run_id for r in runs])
        requeued += report.queued
    return requeued, skipped


def _stage_timeout_of(conn: redis.Redis, runs: list[RunSpec]) -> int:
    job_ids = [job_id_for(sid) for run in runs for sid in run.stages]
    for job_id in job_ids:
        raw = conn.hget(Job.key_for(job_id), "timeout")
        if raw:
            return int(float(_decode(raw)))
    return 86400


def check_priority(value: str) -> str:
    if value not in keys.PRIORITIES:
        raise UsageError(f'unknown priority "{value}"; use one of: {", ".join(keys.PRIORITIES)}')
    return value


def stage_kind_label(kind: str) -> str:
    return StageKind(kind).value if kind else "?"
