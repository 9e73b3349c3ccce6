"""The one function the worker executes: run a stage and write what happened back to Redis.

It runs inside RQ's work horse (a fork of the worker). Everything about the GPU work itself is in
jobs/ml/stages.py; this module is the bookkeeping around it: lease, heartbeat, progress, cancel and
preempt flags, logs, results, run status, fair-share usage and the grid-done notification.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from typing import TYPE_CHECKING, Any

import redis

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.durable import needed_bytes, write_atomically
from stl.jobs.errors import (
    DamagedRecord,
    ForeignJob,
    MachineFault,
    ModelError,
    ParentModelMissing,
    StageCanceled,
    StageLeaseLost,
    StagePreempted,
    StageWaitsForParent,
)
from stl.jobs.faults import parse_faults
from stl.jobs.health import HOST_FAULT_TTL_S, MAX_MACHINE_FAULTS, machine_fault
from stl.jobs.layout import SPEC_FILE
from stl.jobs.queue.admission_gate import cap_horse_memory, record_horse_peak
from stl.jobs.queue.devices import DEVICE_ACCOUNTED_AT, DEVICE_SECONDS, settle_device_seconds
from stl.jobs.queue.fairshare import charge_usage
from stl.jobs.queue.preemption import preempted_line
from stl.jobs.queue.runstate import finish_stage_records, start_stage_record, update_runs_if
from stl.jobs.queue.stage_lease import StageLease
from stl.jobs.queue.stage_reporter import StageReporter
from stl.jobs.settings import load_settings
from stl.jobs.specs import RunStatus, StageKind, StageSpec
from stl.jobs.states import LIVE

if TYPE_CHECKING:
    from stl.jobs.ml.stages import StageContext, StageOutcome
    from stl.jobs.ml.train import TrainOutcome
    from stl.jobs.queue.fence import StageFence
    from stl.jobs.settings import Settings

FAILURE_MESSAGE_MAX = 500
# What StageSpec.stage_id makes: the id becomes a folder name under STL_HOME and part of Redis keys.
STAGE_ID = re.compile(r"^[0-9a-f]{20}$")
PARENT_LOOKS = 3  # a parent that finishes just as its child looks for its model: look again, this often


def _stage_run_ids(conn: redis.Redis, stage_id: str) -> list[str]:
    return [text(r) for r in conn.smembers(keys.stage_runs(stage_id))]


def _write_run_dirs(settings: Settings, conn: redis.Redis, run_ids: list[str], stage_id: str,
                    spec: StageSpec) -> None:
    """STL_HOME/runs/<id>/ holds the run's record, a link to each stage's folder, and its results."""
    for run_id in run_ids:
        run_dir = settings.runs_dir / run_id
        (run_dir / "stages").mkdir(parents=True, exist_ok=True)
        link = run_dir / "stages" / f"{spec.kind.value}-{stage_id}"
        if not link.exists():
            with contextlib.suppress(FileExistsError):
                link.symlink_to(settings.stages_dir / stage_id, target_is_directory=True)
    write_run_records(settings, conn, run_ids)


def write_run_records(settings: Settings, conn: redis.Redis, run_ids: list[str]) -> None:
    """STL_HOME/runs/<id>/run.json: the run as `stl status --json` shows it, as of now (a stage began or
    ended). Only for runs that have a folder, i.e. ones a stage has started."""
    from stl.jobs.queue.records import run_rows

    for row in run_rows(conn, [r for r in run_ids if (settings.runs_dir / r).is_dir()]):
        record = json.dumps(row.to_json(), indent=2, sort_keys=True) + "\n"
        write_atomically(settings.runs_dir / row.id / "run.json", record)


def run_stage(stage_id: str) -> dict[str, Any]:
    """RQ entry point: execute one stage. The only function stl's worker will run."""
    from rq import get_current_job

    from stl.jobs.ml.stages import StageContext, pick_device
    from stl.jobs.queue.connection import connect

    if not STAGE_ID.match(stage_id):
        raise ForeignJob(f"{stage_id!r} is not a stage id; stl runs only jobs written by `stl enqueue`")
    settings = load_settings()
    job = get_current_job()
    conn: redis.Redis = job.connection if job is not None else connect(settings, start_embedded=False)
    stage_key = keys.stage(stage_id)
    spec = _stage_spec_to_run(conn, settings, stage_id)
    lease = None if spec is None else _take_lease(conn, stage_id)
    if spec is None or lease is None:
        return {"stage": stage_id, "status": "already finished"}
    holder = lease.holder
    workdir = settings.stages_dir / stage_id
    reporter = StageReporter(conn, stage_id, workdir, lease)
    started = time.time()
    user = text(conn.hget(stage_key, "user")) or "unknown"
    faults = parse_faults(settings.fault_inject)
    # From here on the lease is held: every way out must release it and record what happened.
    try:
        faults.before_stage(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
        _mark_started(conn, settings, lease, spec, started)
        lease.start_heartbeat()

        device = pick_device()
        cap_horse_memory(conn, stage_id, device, reporter.log)  # several stages on one GPU: its share
        reporter.log(f"stage {spec.kind.value} {stage_id} started on {holder} ({device}); "
                     f"model {spec.model}, tasks {', '.join(spec.tasks)}")
        parent_dir = settings.stages_dir / spec.parent if spec.parent else None
        ctx = StageContext(workdir=workdir, parent_dir=parent_dir, device=device,
                           on_step=faults.paced(reporter.on_step),
                           should_stop=reporter.should_stop, log=reporter.log, oom_at_step=faults.oom_at_step,
                           fence=lease.fence.check)
        outcome = _execute_once_its_parent_is_there(conn, settings, stage_id, spec, ctx, reporter)
    except StageLeaseLost:
        _stand_down(lease)
        raise
    except StageWaitsForParent:
        if lease.taken_over():
            raise _stand_down(lease) from None
        _charge(conn, user, stage_id, started)  # it went back to wait (the log says why): it neither ended nor failed
        lease.release()
        raise
    except StagePreempted as e:
        if lease.taken_over():
            raise _stand_down(lease) from e
        reporter.log(preempted_line(conn, stage_id, e, time.time() - started))
        _back_to_queue(conn, lease.fence)
        _charge(conn, user, stage_id, started)  # the GPU time spent so far counts towards fair share, resumed or not
        lease.release()
        raise
    except StageCanceled as e:
        if lease.taken_over():  # should_stop said "cancel" for that too
            raise _stand_down(lease) from e
        who = text(conn.hget(stage_key, "cancel"))  # `stl cancel` leaves its user's name here
        reporter.log(f"canceled{f' by {who}' if who and who != 'cancel' else ''}: {e}")
        finish_stage(conn, settings, stage_id, spec, status=RunStatus.canceled, error=str(e) or "canceled",
                      started=started, user=user, fence=lease.fence)
        lease.release()
        raise
    except BaseException as e:
        if lease.taken_over():  # e.g. its files changed under it by the horse that took over
            raise _stand_down(lease) from e
        _record_failure(conn, settings, stage_id, spec, e, reporter=reporter, lease=lease, user=user,
                        started=started)
        raise
    result = outcome.to_dict()
    try:
        if outcome.train is not None and outcome.train.oom_retries:
            _record_oom_retries(reporter, lease.fence, outcome.train)
        reporter.log(f"finished in {time.time() - started:.1f} s")
        record_horse_peak(conn, stage_id, spec, device)
        finish_stage(conn, settings, stage_id, spec, status=RunStatus.finished, error="", started=started,
                      user=user, result=result, fence=lease.fence)
    except StageLeaseLost:
        _stand_down(lease)
        raise
    lease.release()
    return {"stage": stage_id, "status": "finished"}


def _stage_spec_to_run(conn: redis.Redis, settings: Settings, stage_id: str) -> StageSpec | None:
    """The spec of a stage to run; None if it is finished already. Raises StageCanceled (removed or canceled),
    or fails a stage whose spec cannot be read."""
    stage_key = keys.stage(stage_id)
    raw_spec = conn.hget(stage_key, "spec")
    if not raw_spec:
        raise StageCanceled(f"stage {stage_id} has no record in Redis; it was removed")
    status = text(conn.hget(stage_key, "status"))
    if status == RunStatus.finished.value:
        return None
    if status == RunStatus.canceled.value:
        raise StageCanceled(f"stage {stage_id} was canceled before it started")
    try:
        return StageSpec.model_validate_json(raw_spec)
    except ValueError as e:  # pydantic's ValidationError is one
        raise fail_unreadable_stage(conn, settings, stage_id, e) from e


def _record_failure(conn: redis.Redis, settings: Settings, stage_id: str, spec: StageSpec, e: BaseException, *,
                    reporter: StageReporter, lease: StageLease, user: str, started: float) -> None:
    """A stage that raised: back to the queue if the machine failed it (raises MachineFault), else failed."""
    stage_key = keys.stage(stage_id)
    message = _failure_message(e, spec)
    fault = machine_fault(e)
    need = needed_bytes(e)  # a full disk: what the failed save needed, so the worker waits for that much room
    if fault is not None:
        # The other workers of this host check the machine before they take a stage (this one included).
        conn.set(keys.host_fault(socket.gethostname()), f"{time.time():.3f}|{fault}", ex=HOST_FAULT_TTL_S)
        attempt = conn.hincrby(stage_key, "machine_faults", 1)
        if attempt < MAX_MACHINE_FAULTS:
            reporter.log(f"stopped by a fault of this machine, not of the stage ({fault}); back to the head of "
                         f"the queue (attempt {attempt} of {MAX_MACHINE_FAULTS}); the worker takes no work "
                         "until the machine is healthy again")
            _back_to_queue(conn, lease.fence, machine_fault=fault, disk_needed_bytes=need)
            _charge(conn, user, stage_id, started)
            lease.release()
            raise MachineFault(f"stage {stage_id}: {fault}") from e
        message += f" (the machine failed this stage {attempt} times; `stl retry` it once the machine is fixed)"
        # its worker pauses too, and checks the machine
        conn.hset(stage_key, mapping={"machine_fault": fault, "disk_needed_bytes": need})
    reporter.log(f"failed: {message}")
    if isinstance(e, ModelError) and e.detail:  # the whole story behind a short reason: the loaders' words
        reporter.log(f"  in full: {e.detail}")
    finish_stage(conn, settings, stage_id, spec, status=RunStatus.failed, error=message,
                  started=started, user=user, fence=lease.fence)
    lease.release()


def _execute_once_its_parent_is_there(conn: redis.Redis, settings: Settings, stage_id: str, spec: StageSpec,
                                      ctx: StageContext, reporter: StageReporter) -> StageOutcome:
    """Run the stage; if its parent's model is missing, the parent is made again first and this stage waits
    for it (StageWaitsForParent), or fails where there is nothing to wait for (stl.jobs.queue.remake)."""
    from stl.jobs.ml.stages import execute_stage
    from stl.jobs.queue.remake import wait_for_parent

    for _ in range(PARENT_LOOKS):
        # Read before the stage looks for the model: a parent that finishes in between is not made twice.
        seen = text(conn.hget(keys.stage(spec.parent), "status")) if spec.parent else ""
        try:
            return execute_stage(spec, ctx)
        except ParentModelMissing as missing:
            outcome, line = wait_for_parent(conn, settings, stage_id, spec, seen=seen, missing=missing)
            if outcome == "look_again":  # the parent finished as this stage looked: its model is there now
                continue
            reporter.log(line)
            raise StageWaitsForParent(line) from missing
    return execute_stage(spec, ctx)


def fail_unreadable_stage(conn: redis.Redis, settings: Settings, stage_id: str, error: Exception) -> DamagedRecord:
    """A stage whose spec is not what stl writes (another tool or a hand wrote it) can never run: it fails now,
    once, with its runs. Left queued, it would be taken, fail and be requeued as an orphan again and again."""
    from pydantic import ValidationError

    detail = ("; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in error.errors()[:3])
              if isinstance(error, ValidationError) else " ".join(str(error).split()))
    message = (f"its record {keys.stage(stage_id)} holds a spec stl cannot read "
               f"({detail[:200] + '…' if len(detail) > 200 else detail}); enqueue the grid file again, which "
               "writes the stage anew (`stl retry` would read the same record)")
    conn.rpush(keys.stage_log(stage_id), f"{time.strftime('%Y-%m-%d %H:%M:%S')} failed: {message}")
    finish_stage(conn, settings, stage_id, None, status=RunStatus.failed, error=message, started=time.time(),
                 user=text(conn.hget(keys.stage(stage_id), "user")) or "unknown")
    return DamagedRecord(f"stage {stage_id}: {message}")


def _take_lease(conn: redis.Redis, stage_id: str) -> StageLease | None:
    """The stage's lease, held by this horse; None if the stage finished while another horse held it."""
    lease = StageLease(conn, stage_id, f"{socket.gethostname()}:{os.getpid()}")
    while not lease.acquire():
        # Another horse holds the stage (a false orphan alarm): wait for it rather than run it twice.
        time.sleep(2)
        status = text(conn.hget(keys.stage(stage_id), "status"))
        if status == RunStatus.finished.value:
            return None
        if status in (RunStatus.failed.value, RunStatus.canceled.value):
            raise StageCanceled(f"stage {stage_id} {status} in another work horse")
    return lease


def _mark_started(conn: redis.Redis, settings: Settings, lease: StageLease, spec: StageSpec, started: float) -> None:
    """The stage and its live runs are running, on this horse (StageCanceled if a cancel came first)."""
    stage_id = lease.stage_id
    # The preempt flag is left alone: a worker told to stop just before this horse started has set it.
    status = start_stage_record(conn, stage_id, {
        "status": RunStatus.running.value, "started_at": started, "heartbeat": started, "worker": lease.holder,
        "error": "", "eta_s": "", "eta_at": "", "machine_fault": "", "disk_needed_bytes": "",
        DEVICE_SECONDS: 0, DEVICE_ACCOUNTED_AT: started}, fence=lease.fence)  # its share of the device: devices.py
    if status != "started":  # canceled since its status was read above
        raise StageCanceled(f"stage {stage_id} was {status or 'removed'} before it started")
    live = update_runs_if(conn, _stage_run_ids(conn, stage_id), allowed=LIVE,
                          fields={"status": RunStatus.running.value, "current_stage": stage_id},
                          fields_if_unset={"started_at": started}, fence=lease.fence)
    _write_run_dirs(settings, conn, live, stage_id, spec)


def _stand_down(lease: StageLease) -> StageLeaseLost:
    """A horse that another took the stage over from (this one was frozen, or cut off, past its lease) ends
    without writing anything more: its worker logs the error it returns, the stage's log is the new horse's."""
    lease.lost = True
    lease.release()  # stops the heartbeat; a newer horse's lease is left alone
    return lease.fence.stale()


def _charge(conn: redis.Redis, user: str, stage_id: str, started: float, now: float | None = None) -> None:
    """Fair share: a stage's GPU time goes to its user however the stage ends (a lost charge only skews order):
    its share of the device (stl.jobs.queue.devices), its wall time where it kept no account."""
    end = now or time.time()
    share = settle_device_seconds(conn, stage_id, end)
    with contextlib.suppress(redis.RedisError):
        charge_usage(conn, user, end - started if share is None else share, now=end)


def _back_to_queue(conn: redis.Redis, fence: StageFence, *, machine_fault: str = "",
                   disk_needed_bytes: int = 0) -> None:
    """The stage did not end: it and its runs are queued again (the worker puts its job back at the head)."""
    stage_id = fence.stage_id
    fence.write(lambda pipe: (
        pipe.hset(keys.stage(stage_id), mapping={"status": RunStatus.queued.value, "preempt": "",
                                                 "preempted_for": "", "worker": "", "machine_fault": machine_fault,
                                                 "disk_needed_bytes": disk_needed_bytes}),
        pipe.srem(keys.RUNNING_STAGES, stage_id)))
    update_runs_if(conn, _stage_run_ids(conn, stage_id), allowed=LIVE,
                   fields={"status": RunStatus.queued.value, "current_stage": ""}, fence=fence)


def _record_oom_retries(reporter: StageReporter, fence: StageFence, train: TrainOutcome) -> None:
    """Out-of-memory back-offs go on the stage record and in its log, where `stl logs` shows them."""
    steps = "; ".join(f"step {r.step}: micro-batch {r.micro_batch} -> {r.new_micro_batch} "
                      f"x {r.new_grad_accum} accumulation, from step {r.restarted_from}" for r in train.oom_retries)
    reporter.log(f"finished after {len(train.oom_retries)} out-of-memory retr"
                 f"{'y' if len(train.oom_retries) == 1 else 'ies'} ({steps}); now micro-batch {train.micro_batch} "
                 f"x {train.grad_accum} accumulation")
    fence.write(lambda pipe: pipe.hset(keys.stage(fence.stage_id), mapping={
        "oom_retries": json.dumps([r.to_dict() for r in train.oom_retries]),
        "micro_batch": train.micro_batch, "grad_accum": train.grad_accum}))


def _failure_message(error: BaseException, spec: StageSpec) -> str:
    name = type(error).__name__
    if name == "JobTimeoutException":
        return f"the {spec.kind.value} stage ran past its time limit ({error}); raise stage_timeout in the grid"
    if isinstance(error, OSError) and error.errno == 28:
        return ("no space left on the disk under STL_HOME; `stl disk` shows what takes it and "
                "`stl disk --prune finetune` frees finished runs' few-shot models; then `stl retry`")
    # One line, of bounded length: it becomes the run's error in `stl status`.
    detail = " ".join(str(error).split())
    if len(detail) > FAILURE_MESSAGE_MAX:
        detail = detail[:FAILURE_MESSAGE_MAX - 1] + "…"
    return f"{name}: {detail}" if detail else name


def finish_stage(conn: redis.Redis, settings: Settings, stage_id: str, spec: StageSpec | None, *,
                  status: RunStatus, error: str, started: float, user: str,
                  result: dict[str, Any] | None = None, fence: StageFence | None = None) -> bool:
    """Record a stage's end on the stage and on every run that needs it. False: the stage had finished
    before, and nothing was written. With its horse's `fence`: StageLeaseLost if another horse took it since.
    `spec` None: it could not be read (`fail_unreadable_stage`)."""
    from stl.jobs.queue.queueing import cancel_stage_jobs

    kind = spec.kind.value if spec is not None else text(conn.hget(keys.stage(stage_id), "kind")) or "unreadable"
    now = time.time()
    metrics = (result or {}).get("metrics") or []
    stage_fields: dict[str, Any] = {"status": status.value, "ended_at": now, "error": error, "cancel": ""}
    if result is not None:
        stage_fields["outcome"] = json.dumps(result)
        if kind == StageKind.eval.value:
            stage_fields["metrics"] = json.dumps(metrics)
    end = finish_stage_records(
        conn, stage_id, status=status, stage_fields=stage_fields, work=spec.work if spec is not None else 0,
        metrics=metrics if status == RunStatus.finished else [], now=now,
        run_error=f"{kind} stage {stage_id}: {error}", fence=fence)
    if end.already:
        return False  # its runs counted it, its results are in, and its GPU time was charged, once
    run_ids, grids, finished_runs = end.runs, end.grids, end.finished
    for run_id in end.incomplete:
        print(f"stl: run {run_id} ran every stage but lacks some of its results; it is marked failed "
              "(`stl status` names them)", flush=True)
    # Charged once the stage no longer counts as running (fair share adds running stages' time itself).
    _charge(conn, user, stage_id, started, now)
    if status != RunStatus.finished:
        # Stages that only the now-failed runs needed will never be able to run.
        cancel_stage_jobs(conn, run_ids, reason=f"{kind} stage {stage_id} {status.value}")
    if status == RunStatus.finished:
        for run_id in run_ids:
            # A copy for people reading STL_HOME; Redis has the results, so a full disk does not undo them.
            with contextlib.suppress(OSError):
                _write_results_file(settings, conn, run_id)
    with contextlib.suppress(OSError):
        write_run_records(settings, conn, run_ids)
    if finished_runs and settings.prune_finetune:
        _prune_finetune_models(conn, settings, finished_runs, user=user)
    for grid in grids:
        try:
            _notify_if_grid_done(conn, settings, grid)
        except Exception as e:  # noqa: BLE001 - a failure to notify is logged and never fails a run
            print(f"stl notify: could not notify for grid {grid}: {e}", flush=True)
    return True


def _prune_finetune_models(conn: redis.Redis, settings: Settings, run_ids: list[str], *, user: str) -> None:
    from stl.jobs.queue.disk import prune_finished_runs_finetune_models

    try:
        report = prune_finished_runs_finetune_models(conn, settings, run_ids, user=f"STL_PRUNE_FINETUNE ({user})")
    except Exception as e:  # noqa: BLE001 - a model left on disk never fails a run
        print(f"stl prune: could not prune the few-shot models of {len(run_ids)} finished run(s): {e}", flush=True)
        return
    if report.pruned:
        print(f"stl prune: deleted {len(report.pruned)} few-shot model(s) of finished runs "
              f"({report.freed_bytes / 2**20:.1f} MiB; STL_PRUNE_FINETUNE)", flush=True)


def _write_results_file(settings: Settings, conn: redis.Redis, run_id: str) -> None:
    from stl.jobs.queue.run_results import read_results

    (results,) = read_results(conn, [run_id])  # a result another tool damaged is left out, not fatal
    if not results:
        return
    run_dir = settings.runs_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(run_dir / "metrics.json", json.dumps(results, indent=2, sort_keys=True))


def _notify_if_grid_done(conn: redis.Redis, settings: Settings, grid: str) -> None:
    from stl.jobs.queue.notify import notify_grid_done
    from stl.jobs.queue.records import grid_summary

    summary = grid_summary(conn, grid)
    if summary["live"] > 0:
        return
    # Exactly one process notifies: the one that claims the flag.
    if not conn.hsetnx(keys.grid(grid), "notified_at", time.time()):
        return
    conn.hset(keys.grid(grid), mapping={"ended_at": time.time()})
    if settings.notify_cmd or settings.notify_url:
        notify_grid_done(grid, summary, command=settings.notify_cmd, url=settings.notify_url,
                         log=lambda line: print(f"stl notify: {line}", flush=True))
