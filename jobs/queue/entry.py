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
import threading
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
from stl.jobs.layout import LOG_FILE, SPEC_FILE
from stl.jobs.queue.devices import DEVICE_ACCOUNTED_AT, DEVICE_SECONDS, settle_device_seconds
from stl.jobs.queue.fairshare import charge_usage
from stl.jobs.queue.fence import StageFence, generation_is_current
from stl.jobs.queue.runstate import finish_stage_records, start_stage_record, update_runs_if
from stl.jobs.settings import load_settings
from stl.jobs.specs import RunStatus, StageKind, StageSpec
from stl.jobs.states import LIVE

if TYPE_CHECKING:
    from pathlib import Path

    from stl.jobs.ml.progress import StepReport
    from stl.jobs.ml.stages import StageContext, StageOutcome
    from stl.jobs.ml.train import TrainOutcome
    from stl.jobs.settings import Settings

HEARTBEAT_EVERY_S = 3.0
LEASE_TTL_S = 30
PROGRESS_EVERY_S = 2.0
LOG_PROGRESS_EVERY_S = 30.0  # a progress line in the stage log (`stl logs -f`), beside the status table's
FLAGS_EVERY_S = 0.2  # a cancel or SIGTERM is read at most this often (one HMGET), between steps or batches
LOG_LINES_KEPT = 5000
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
FAILURE_MESSAGE_MAX = 500
# What StageSpec.stage_id makes: the id becomes a folder name under STL_HOME and part of Redis keys.
STAGE_ID = re.compile(r"^[0-9a-f]{20}$")
STEPS_KEPT = 20_000
PARENT_LOOKS = 3  # a parent that finishes just as its child looks for its model: look again, this often



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


class StageReporter:
    """Throttled writes of progress, logs and flags for one stage."""

    def __init__(self, conn: redis.Redis, stage_id: str, workdir: Path, lease: StageLease) -> None:
        self.conn = conn
        self.stage_id = stage_id
        self.lease = lease
        self.log_file = workdir / LOG_FILE
        self._last_progress = 0.0
        self._last_progress_line: float | None = None
        # (step, monotonic time) of the first report of the current attempt: the pace for the ETA is measured
        # from there, leaving out loading the model and compiling, which precede that report. An attempt is
        # a phase (train or eval) with one micro-batch plan; an OOM retry (a smaller micro-batch) or a step
        # that goes back starts a new one, since the retry reloads, recompiles and repeats steps.
        self._pace_from: tuple[int, float] | None = None
        self._attempt: tuple[str, int, int] | None = None
        self._last_step = -1
        self._last_flags = 0.0
        self._flag: str | None = None

    def log(self, line: str) -> None:
        """A line in the stage's log, in Redis and in its folder; none from a horse another one took over from."""
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        if self.lease.lost:
            return
        try:
            self.lease.fence.write(lambda pipe: (pipe.rpush(keys.stage_log(self.stage_id), stamped),
                                                 pipe.ltrim(keys.stage_log(self.stage_id), -LOG_LINES_KEPT, -1)))
        except StageLeaseLost:
            self.lease.lost = True
            return
        except redis.RedisError:
            pass  # the file keeps it
        try:
            with self.log_file.open("a") as f:
                f.write(stamped + "\n")
        except OSError:
            pass  # a full disk or a missing folder: Redis keeps the line

    def _eta_s(self, report: StepReport) -> float | None:
        """Seconds left in this phase at the pace since the first report of this attempt; None until then."""
        now = time.monotonic()
        attempt = (report.phase, report.micro_batch, report.grad_accum)
        new_attempt = attempt != self._attempt or report.step <= self._last_step
        self._attempt, self._last_step = attempt, report.step
        if new_attempt or self._pace_from is None:
            self._pace_from = (report.step, now)
            return None
        step, at = self._pace_from
        return (now - at) / (report.step - step) * max(report.total - report.step, 0)

    def on_step(self, report: StepReport) -> None:
        now = time.monotonic()
        eta = self._eta_s(report)
        last = report.step >= report.total
        training = report.phase == "train"
        has_loss = training and report.loss == report.loss  # evaluation reports progress with a NaN loss
        # The loss curve (`stl plot`) is made of training steps only.
        step_record = json.dumps({
            "step": report.step, "loss": report.loss if has_loss else None, "lr": report.learning_rate,
            "samples_per_s": report.samples_per_s, "tokens_per_s": report.tokens_per_s,
            "mfu": report.mfu, "t": time.time()}) if training else None
        progress = last or now - self._last_progress >= PROGRESS_EVERY_S
        if progress:
            self._last_progress = now

        def queue(pipe: redis.client.Pipeline) -> None:
            if step_record is not None:
                pipe.rpush(keys.stage_steps(self.stage_id), step_record)
                pipe.ltrim(keys.stage_steps(self.stage_id), -STEPS_KEPT, -1)
            if progress:
                pipe.hset(keys.stage(self.stage_id), mapping={
                    "step": report.step, "total": report.total, "loss": f"{report.loss:.4f}" if has_loss else "",
                    "samples_per_s": f"{report.samples_per_s:.1f}", "tokens_per_s": f"{report.tokens_per_s:.1f}",
                    "mfu": "" if report.mfu is None else f"{report.mfu:.4f}",
                    "elapsed_s": f"{report.elapsed_s:.1f}", "micro_batch": report.micro_batch,
                    "grad_accum": report.grad_accum, "heartbeat": time.time(),
                    "eta_s": "" if eta is None else f"{eta:.1f}", "eta_at": "" if eta is None else time.time(),
                })

        if step_record is not None or progress:
            try:
                self.lease.fence.write(queue)  # a horse another one took over from stops here (StageLeaseLost)
            except StageLeaseLost:
                self.lease.lost = True
                raise
            except redis.RedisError:
                pass
        if step_record is not None:
            with contextlib.suppress(OSError), (self.log_file.parent / "steps.jsonl").open("a") as f:
                f.write(step_record + "\n")
        if (self._last_progress_line is None or last
                or now - self._last_progress_line >= LOG_PROGRESS_EVERY_S):
            self._last_progress_line = now
            self.log(progress_line(report, eta))

    def should_stop(self) -> str | None:
        """"cancel" (also once another horse took the stage over: the stage ends with StageLeaseLost),
        "preempt", or None."""
        if self.lease.lost:
            return "cancel"
        now = time.monotonic()
        if self._flag is None and now - self._last_flags >= FLAGS_EVERY_S:
            self._last_flags = now
            try:
                pipe = self.conn.pipeline(transaction=False)
                pipe.hmget(keys.stage(self.stage_id), "cancel", "preempt")
                pipe.get(self.lease.fence.key)
                (cancel, preempt), generation = pipe.execute()
            except redis.RedisError:
                return None
            if not generation_is_current(generation, self.lease.fence.token):
                self.lease.lost = True
                return "cancel"
            if text(cancel):
                self._flag = "cancel"
            elif text(preempt):
                self._flag = "preempt"
        return self._flag


def progress_line(report: StepReport, eta_s: float | None) -> str:
    """`step 120/2000 (6%), loss 2.3412, 97.7 samples/s, MFU 12.3%, about 5 min 12 s left`: one log line."""
    from stl.jobs.humanize import format_duration

    percent = f" ({report.step / report.total:.0%})" if report.total else ""
    if report.phase == "train":
        parts = [f"step {report.step}/{report.total}{percent}"]
        if report.loss == report.loss:  # NaN: no loss since the previous report
            parts.append(f"loss {report.loss:.4f}")
        parts.append(f"{report.samples_per_s:.1f} samples/s")
        if report.mfu is not None:
            parts.append(f"MFU {report.mfu:.1%}")
    else:
        parts = [f"scored {report.step}/{report.total} examples{percent}", f"{report.samples_per_s:.1f} examples/s"]
    if eta_s is not None and report.step < report.total:
        parts.append(f"about {format_duration(eta_s)} left")
    return ", ".join(parts)


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
    raw_spec = conn.hget(stage_key, "spec")
    if not raw_spec:
        raise StageCanceled(f"stage {stage_id} has no record in Redis; it was removed")
    status = text(conn.hget(stage_key, "status"))
    if status == RunStatus.finished.value:
        return {"stage": stage_id, "status": "already finished"}
    if status == RunStatus.canceled.value:
        raise StageCanceled(f"stage {stage_id} was canceled before it started")
    try:
        spec = StageSpec.model_validate_json(raw_spec)
    except ValueError as e:  # pydantic's ValidationError is one
        raise fail_unreadable_stage(conn, settings, stage_id, e) from e

    lease = _take_lease(conn, stage_id)
    if lease is None:
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
        reporter.log(f"stage {spec.kind.value} {stage_id} started on {holder} ({device}); "
                     f"model {spec.model}, tasks {', '.join(spec.tasks)}")
        parent_dir = settings.stages_dir / spec.parent if spec.parent else None
        ctx = StageContext(workdir=workdir, parent_dir=parent_dir, device=device, on_step=reporter.on_step,
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
        reporter.log(f"preempted: {e}; back to the head of the queue")
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
        raise
    result = outcome.to_dict()
    try:
        if outcome.train is not None and outcome.train.oom_retries:
            _record_oom_retries(reporter, lease.fence, outcome.train)
        reporter.log(f"finished in {time.time() - started:.1f} s")
        finish_stage(conn, settings, stage_id, spec, status=RunStatus.finished, error="", started=started,
                      user=user, result=result, fence=lease.fence)
    except StageLeaseLost:
        _stand_down(lease)
        raise
    lease.release()
    return {"stage": stage_id, "status": "finished"}


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
        pipe.hset(keys.stage(stage_id), mapping={"status": RunStatus.queued.value, "preempt": "", "worker": "",
                                                 "machine_fault": machine_fault,
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
    from stl.jobs.queue.records import read_results

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
