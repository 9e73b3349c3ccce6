"""The GPU worker: an RQ worker that takes stl's stage jobs one at a time, fairly between users.

The parent imports torch and transformers once, before forking, and never touches CUDA: RQ forks a
work horse per job, and a CUDA context created before a fork is unusable in the child.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import time
import zlib
from typing import TYPE_CHECKING, Any

import redis
from rq import Queue, Worker
from rq.exceptions import DequeueTimeout
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.disk_space import free_space
from stl.jobs.errors import MachineFault, StageLeaseLost, StagePreempted, StageWaitsForParent, StlError
from stl.jobs.faults import parse_faults
from stl.jobs.health import HEALTH_CHECK_EVERY_S, HOST_FAULT_TTL_S, machine_problem
from stl.jobs.queue.admission_gate import AdmissionGate
from stl.jobs.queue.devices import device_id
from stl.jobs.queue.entry import STAGE_ID
from stl.jobs.queue.fairshare import queue_order
from stl.jobs.queue.preemption import preempt_if_due
from stl.jobs.queue.queueing import ENTRY_POINT, LEGACY_ENTRY_POINTS, job_id_for, stage_id_for
from stl.jobs.queue.recovery import fail_stage, find_dropped_jobs, reap_orphans, requeue_orphan, worker_is_dead
from stl.worker.device_memory import device_memory_for, sharing_mode
from stl.worker.gpu import GpuProbe
from stl.worker.slots import account_device_share, share_device, slot_worker_name

if TYPE_CHECKING:
    from types import TracebackType

    from redis.typing import EncodableT, FieldT
    from rq.executions import Execution
    from rq.job import Job

    from stl.jobs.settings import Settings

POLL_S = 1  # how long one blocking dequeue waits before the worker looks at new users' queues
# How long the thread that listens for RQ's commands (shutdown, kill-horse, stop-job: rq-dashboard's buttons)
# waits per read. Stopping the worker waits for that read to end: RQ's own 60 s made every exit, `--burst`
# on an empty queue included, hang for up to a minute. Reads that time out cost no Redis command.
COMMAND_POLL_S = 0.5
REAP_EVERY_S = 2.0  # a live worker finds a dead local horse within this; the check is a few reads
WORKER_RECORD_TTL_S = 120
# Looking for jobs taken off a queue by a worker that died reads every live run: not at every reap, but
# when a worker starts, when it sees another die, and every ten minutes.
DROPPED_SCAN_EVERY_S = 600.0
DROPPED_CONFIRM_S = 10.0  # a job in the hands of a live worker is recorded as started long before this
# Delete a lease only if the given (dead) horse holds it.
_DROP_LEASE_OF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _not_a_stage_job(job: Job) -> str | None:
    """What is wrong with a job that names stl's entry point but was not written by `stl enqueue`."""
    args, kwargs = job.args, job.kwargs
    if kwargs or len(args) != 1 or not isinstance(args[0], str) or not STAGE_ID.match(args[0]):
        return "its arguments are not one stage id"
    if job.id != job_id_for(args[0]):
        return "its id does not match its stage"
    # RQ imports and calls these by name, in the worker and in the horse: a way round the entry point.
    callbacks = [name for name in ("success", "failure", "stopped")
                 if getattr(job, f"_{name}_callback_name", None)]
    if callbacks:
        return f"it names {'/'.join(callbacks)} callbacks"
    return None


def _rename_entry_point(job: Job) -> str:
    """A job queued under the entry point's old module path is rewritten to the current one, in Redis too, so
    the work horse imports stl.jobs.queue.entry and the job keeps its place and history."""
    _ = job.args, job.kwargs, job.instance  # decoded first: setting func_name re-encodes from these fields
    job.func_name = ENTRY_POINT
    job.connection.hset(job.key, "data", zlib.compress(job.data))  # as RQ stores it
    return ENTRY_POINT


class StlWorker(Worker):
    """RQ's forking worker with fair-share queue order, a safe entry point and preemption."""

    log_result_lifespan = False  # "result is kept for 7776000 seconds" after every stage says nothing useful

    def __init__(self, *, connection: redis.Redis, settings: Settings, gpu_index: int | None,
                 name: str | None = None, slot: int = 1, slots: int = 1) -> None:
        self.settings = settings
        self.gpu_index = gpu_index
        self._probe = GpuProbe(gpu_index)
        self._last_reap = 0.0
        self._last_dropped_scan = -DROPPED_SCAN_EVERY_S  # the first reap looks
        self._dropped: dict[str, float] = {}  # stage id -> when first seen in no queue
        self._current_stage = ""
        self._pending_orphan = ""
        self._pending_timeout = ""
        self._holding_job = False  # from dequeue until the horse is done: a stop must not drop the job
        self._paused = ""  # why the machine cannot run stages now (a full disk, a broken GPU); "" when it can
        self._disk_need = 0  # while paused for a full disk: what the stage's failed save needed (bytes)
        self._host_fault_seen = ""  # the last machine fault announced on this host that this worker checked
        self._next_health_check = 0.0
        host = socket.gethostname()
        self.host = host
        device = f"gpu{gpu_index}" if gpu_index is not None else ("gpu" if self._probe.has_gpu else "cpu")
        self.slot, self.slots, self.device = slot, slots, device_id(host, device)  # stl.worker.slots
        super().__init__(
            [Queue(keys.queue_name("_", "normal"), connection=connection, serializer=JSONSerializer)],
            name=name or slot_worker_name(host, device, slot, slots, os.getpid()),
            connection=connection,
            serializer=JSONSerializer,
            job_monitoring_interval=5,
        )
        self._refresh_queues()
        # Several stages on one device: admitted by memory (stl.jobs.queue.admission_gate); None: one at a time.
        self.sharing = sharing_mode(has_gpu=self._probe.has_gpu)
        memory = device_memory_for(parse_faults(settings.fault_inject), has_gpu=self._probe.has_gpu,
                                   gpu_index=gpu_index, slots=slots)
        self._admission = None if memory is None else AdmissionGate(
            connection, device=self.device, memory=memory, worker_name=self.name,
            log=lambda line: self.log.info("Worker %s: %s", self.name, line))

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        # RQ has just listed the queues there are now; new users' queues join as they appear.
        self.log.info("Worker %s: takes each stage from whichever user's queue (stl.<user>.<priority>) has used "
                      "the least GPU time lately, new users included", self.name)
        self.log.info("Worker %s: device %s, shared by %s%s", self.name, self.device, self.sharing,
                      "; stages are admitted by device memory" if self._admission else "")

    def subscribe(self) -> None:
        """RQ's subscribe, with a listener that wakes often enough for the worker to stop at once."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]  # RQ types it as None
            sleep_time=COMMAND_POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler)

    # --- which queue next ---------------------------------------------------------------------

    def _refresh_queues(self) -> None:
        names = queue_order(self.connection)
        self.queues = [Queue(n, connection=self.connection, serializer=JSONSerializer) for n in names]
        self._ordered_queues = list(self.queues)

    def reorder_queues(self, reference_queue: Queue) -> None:
        self._refresh_queues()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None
                                     ) -> tuple[Job, Queue] | None:
        """RQ's dequeue loop, but it re-reads fair-share order and reaps orphans while it waits."""
        from rq.worker import WorkerStatus

        self.set_state(WorkerStatus.IDLE)
        self._write_record("paused" if self._paused else "idle")
        idle_since = time.monotonic()
        while True:
            try:
                self.heartbeat()
                if self.should_run_maintenance_tasks:  # as RQ's own loop: its registries are cleaned, idle or not
                    self.run_maintenance_tasks()
                self._reap_if_due()
                self._refresh_queues()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                self.log.error("Worker %s: Redis is unreachable (%s); retrying in 2 s", self.name, e)
                time.sleep(2)
                continue
            if self._stop_requested:
                return None
            if self._paused and not self._healthy_again():
                if timeout is None:  # --burst: nothing more can run here now
                    self.log.error("Worker %s: stopping, the machine cannot run stages (%s); queued stages stay "
                                   "queued", self.name, self._paused)
                    return None
                time.sleep(POLL_S)
                continue
            try:
                if not self._ordered_queues:
                    if timeout is None:
                        return None
                    time.sleep(POLL_S)
                    continue
                self._holding_job = True  # a SIGTERM from here on is noted, not raised mid-dequeue
                if self._admission is not None:  # the head stage is taken only once it fits on the device
                    result = self._admission.take(self._ordered_queues, self._fetch_taken_job)
                    self._holding_job = result is not None
                    if result is not None or (timeout is None and self._admission.queues_empty):
                        return result
                    time.sleep(POLL_S)
                    continue
                result = self.queue_class.dequeue_any(
                    self._ordered_queues, None if timeout is None else POLL_S, connection=self.connection,
                    job_class=self.job_class, serializer=self.serializer,
                    death_penalty_class=self.death_penalty_class,
                )
                self._holding_job = result is not None
                if result is not None or timeout is None:
                    return result
            except DequeueTimeout:
                self._holding_job = False
            except (redis.ConnectionError, redis.TimeoutError) as e:
                self._holding_job = False
                self.log.error("Worker %s: Redis is unreachable (%s); retrying in 2 s", self.name, e)
                time.sleep(2)
                continue
            if self._stop_requested:
                return None
            if max_idle_time is not None and time.monotonic() - idle_since > max_idle_time:
                return None

    def _fetch_taken_job(self, queue_key: str, job_id: str) -> tuple[Job, Queue] | None:
        """RQ's (job, queue) for a job the admission gate took off `queue_key`, as RQ's own dequeue makes it."""
        return self.queue_class._fetch_dequeued_job(  # noqa: SLF001 - RQ's post-pop step, shared with its dequeue
            self.connection, queue_key, job_id, job_class=self.job_class, serializer=self.serializer,
            death_penalty_class=self.death_penalty_class)

    # --- running a job ------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Refuse anything but stl's registered entry point, before a horse is forked for it."""
        try:
            self._execute_job(job, queue)
        finally:
            self._holding_job = False
            if self._admission is not None:
                self._admission.release(stage_id_for(job.id))

    def _execute_job(self, job: Job, queue: Queue) -> None:
        try:
            func_name = job.func_name
        except Exception as e:  # noqa: BLE001 - undecodable (e.g. pickled) data is refused too
            self._refuse(job, queue, f"job {job.id} was refused: its data is not stl's JSON ({type(e).__name__}); "
                         "stl runs only jobs written by `stl enqueue`")
            return
        if func_name in LEGACY_ENTRY_POINTS:
            func_name = _rename_entry_point(job)
        if func_name != ENTRY_POINT:
            self._refuse(job, queue, f"job {job.id} was refused: it names {func_name!r}, but this worker runs "
                         f"only {ENTRY_POINT}; enqueue work with `stl enqueue`")
            return
        problem = _not_a_stage_job(job)
        if problem:
            self._refuse(job, queue, f"job {job.id} was refused: {problem}; stl runs only jobs written by "
                         "`stl enqueue`")
            return
        if self._stop_requested:
            # Told to stop between taking the job and starting it: it goes back where it was.
            queue._enqueue_job(job, at_front=True)  # noqa: SLF001
            self.log.info("Worker %s: stopping; job %s goes back to the head of %s", self.name, job.id, queue.name)
            return
        if self._host_fault_stops_work():
            # Another worker of this host met a machine fault as this job was taken: it goes back, untried.
            queue._enqueue_job(job, at_front=True)  # noqa: SLF001
            return
        self._current_stage = stage_id_for(job.id)
        self._write_record("busy")
        try:
            super().execute_job(job, queue)
            self._pause_if_the_machine_failed(self._current_stage)
        finally:
            self._current_stage = ""
            self._write_record("paused" if self._paused else "idle")

    def monitor_work_horse(self, job: Job, queue: Queue, execution: Execution) -> None:
        """While the horse runs, its stage is in the device's set (stl.jobs.queue.devices): the worker's record
        names the stage from before (execute_job) to after, as stages_on_device wants."""
        with share_device(self.connection, self.device, stage_id_for(job.id), self.log):
            super().monitor_work_horse(job, queue, execution)

    # --- a machine that cannot run stages ---------------------------------------------------------

    def _pause_if_the_machine_failed(self, stage_id: str) -> None:
        """A stage its horse stopped for a fault of the machine (stl.jobs.health): take no work until it is fixed."""
        try:
            fault, need = (text(v) for v in self.connection.hmget(keys.stage(stage_id), "machine_fault",
                                                                  "disk_needed_bytes"))
            self._host_fault_seen = text(self.connection.get(keys.host_fault(self.host)))  # our own: checked below
        except redis.RedisError:
            return  # the next stage meets the fault again, if there is one
        if not fault:
            return
        self.log.error("Worker %s: stage %s was stopped by a fault of this machine (%s); checking the machine",
                       self.name, stage_id, fault)
        # A full disk: the stage needs room for what it failed to save, or it would only fill the disk again.
        self._disk_need = int(need) if need.isdigit() else 0
        # The pause gives the health check's reason from the start, as every later check words it (not the
        # stage's error first): `stl status` shows one reason for the whole pause.
        problem = self._machine_problem()
        if problem is None:
            self.log.info("Worker %s: the machine passed its health check; taking work again", self.name)
            self._disk_need = 0
            return
        self.log.error("Worker %s: taking no work until the machine is healthy again: %s; trying again every %.0f s",
                       self.name, problem, HEALTH_CHECK_EVERY_S)
        self._pause(problem, check_in=HEALTH_CHECK_EVERY_S)

    @property
    def paused_reason(self) -> str:
        return self._paused

    def _host_fault_stops_work(self) -> bool:
        """Whether a fault another worker of this host met (and announced) is this machine's too: checked once
        per announcement, before the next stage, so that stage does not meet it again."""
        try:
            announced = text(self.connection.get(keys.host_fault(self.host)))
        except redis.RedisError:
            return False
        if not announced or announced == self._host_fault_seen:
            return False
        self._host_fault_seen = announced
        problem = self._machine_problem()
        if problem is None:
            self.log.info("Worker %s: another worker of this host met a machine fault (%s); this worker's health "
                          "check passed, so it goes on", self.name, announced.partition("|")[2])
            return False
        self.log.error("Worker %s: another worker of this host met a machine fault, and this one finds it too (%s); "
                       "taking no work until the machine is healthy again", self.name, problem)
        self._pause(problem, check_in=HEALTH_CHECK_EVERY_S)
        return True

    def _pause(self, reason: str, *, check_in: float) -> None:
        self._paused, self._next_health_check = reason, time.monotonic() + check_in
        self._write_record("paused")

    def _machine_problem(self) -> str | None:
        return machine_problem(self.settings, gpu=self._probe.has_gpu, faults=parse_faults(self.settings.fault_inject),
                               keep_alive=lambda: self._write_record(None), need_bytes=self._disk_need)

    def _healthy_again(self) -> bool:
        """While paused: try the machine now and then; True once nothing is wrong with it."""
        if time.monotonic() < self._next_health_check:
            return False
        problem = self._machine_problem()
        if problem:
            if problem != self._paused:
                self.log.error("Worker %s: still taking no work: %s; trying again every %.0f s", self.name,
                               problem, HEALTH_CHECK_EVERY_S)
            with contextlib.suppress(redis.RedisError):  # the host's other workers keep checking before work
                self.connection.expire(keys.host_fault(self.host), HOST_FAULT_TTL_S)
            self._pause(problem, check_in=HEALTH_CHECK_EVERY_S)
            return False
        self.log.info("Worker %s: the machine passed its health check; taking work again", self.name)
        self._paused, self._disk_need = "", 0
        self._write_record("idle")
        return True

    def _refuse(self, job: Job, queue: Queue, message: str) -> None:
        self.log.error("Worker %s: %s", self.name, message)
        with self.connection.pipeline() as pipe:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            job._handle_failure(message, pipeline=pipe, worker_name=self.name)  # noqa: SLF001
            pipe.execute()

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """A stage that ends an expected way (canceled, preempted, out of memory, bad data or model) gets one
        line here; its own log (`stl logs`) has the rest. Anything else is a bug and keeps RQ's traceback."""
        error = exc_info[1] if len(exc_info) > 1 else None
        if isinstance(error, StlError) and not self._exc_handlers:  # no handler of ours to call
            self.log.warning("Worker %s: stage %s ended: %s: %s", self.name, stage_id_for(job.id),
                             type(error).__name__, " ".join(str(error).split()))
            return
        super().handle_exception(job, *exc_info)

    def _finalize_failure(self, job: Job, queue: Queue, execution: Execution,
                          exc_info: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
                          ) -> None:
        """In the horse: a preempted stage, or one the machine failed, goes back to the head of its queue, not
        to 'failed'; one that waits for its parent to be made again is an RQ dependent of it already."""
        if isinstance(exc_info[1], StagePreempted | StageLeaseLost | MachineFault | StageWaitsForParent):
            if isinstance(exc_info[1], StageWaitsForParent):
                self.log.info("Worker %s: stage %s waits: %s", self.name, stage_id_for(job.id), exc_info[1])
            if isinstance(exc_info[1], StageLeaseLost):  # the job is the newer horse's now: only say so
                self.log.warning("Worker %s: %s", self.name, exc_info[1])
            self.handle_execution_ended(job, queue, job.failure_callback_timeout)
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                if isinstance(exc_info[1], StagePreempted | MachineFault):
                    job.set_status(JobStatus.QUEUED, pipeline=pipe)
                    queue._enqueue_job(job, pipeline=pipe, at_front=True)  # noqa: SLF001
                pipe.execute()
            return
        super()._finalize_failure(job, queue, execution, exc_info)

    def handle_work_horse_killed(self, job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
        """The horse died (OOM killer, kill -9): resume the stage from its checkpoint, now.

        Unless it died because this worker killed it for running far past its time limit: then it failed.
        """
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        stage_id = stage_id_for(job.id)
        # Only the dead horse's own lease: another horse may hold the stage (a false orphan alarm).
        with contextlib.suppress(redis.RedisError):  # the reaper finds a dead holder by itself
            self.connection.eval(_DROP_LEASE_OF, 1, keys.stage_lease(stage_id), f"{self.host}:{retpid}")
        elapsed = (rq_now() - job.started_at).total_seconds() if job.started_at else 0.0
        if job.timeout and job.timeout > 0 and elapsed > job.timeout:
            self._pending_timeout = stage_id
        else:
            self._pending_orphan = stage_id

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry: Any = None, exc_string: str = "",
                           execution: Execution | None = None) -> None:
        super().handle_job_failure(job, queue, started_job_registry=started_job_registry, exc_string=exc_string,
                                   execution=execution)
        stage_id = stage_id_for(job.id)
        try:
            if self._pending_orphan == stage_id:
                if requeue_orphan(self.connection, self.settings, stage_id, horse_dead=True,
                                  reason=f"its work horse died ({' '.join(exc_string.split())[:120]})"):
                    self.log.warning("Worker %s: the horse of stage %s died; requeued at the head of its queue",
                                     self.name, stage_id)
            elif self._pending_timeout == stage_id:
                fail_stage(self.connection, self.settings, stage_id,
                           f"its work horse ran more than a minute past the stage's time limit ({job.timeout} s) "
                           "and was killed; raise stage_timeout in the grid")
        except redis.RedisError as e:
            # The reaper finds the stage again once Redis answers.
            self.log.error("Worker %s: could not requeue stage %s (%s); the reaper will", self.name, stage_id, e)
        finally:
            self._pending_orphan = self._pending_timeout = ""

    # --- stopping -----------------------------------------------------------------------------

    def request_stop(self, signum: int, frame: Any) -> None:
        """SIGTERM (docker stop): take no new work; a training stage checkpoints and is requeued."""
        if self._current_stage:
            try:
                self.connection.hset(keys.stage(self._current_stage), "preempt", "1")
                self.log.info("Worker %s: asked stage %s to checkpoint and yield", self.name, self._current_stage)
            except redis.RedisError as e:
                self.log.error("Worker %s: could not ask stage %s to yield (%s)", self.name, self._current_stage, e)
        super().request_stop(signum, frame)

    def _shutdown(self) -> None:
        if self._holding_job:
            # A job was just taken off the queue: finish taking it (execute_job puts it back), then stop.
            self._stop_requested = True
            return
        super()._shutdown()

    def set_shutdown_requested_date(self) -> None:
        with contextlib.suppress(redis.RedisError):
            super().set_shutdown_requested_date()

    # --- what `stl status` shows --------------------------------------------------------------

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        super().heartbeat(timeout, pipeline)
        if pipeline is None:
            self._write_record(None)

    def maintain_heartbeats(self, job: Job, execution: Execution) -> None:
        """While the horse works: a Redis outage longer than the connection's patience must not end the
        worker (RQ would quit its loop); the horse goes on, and the next beat gets through."""
        try:
            super().maintain_heartbeats(job, execution)
            self._write_record(None)
            account_device_share(self.connection, self.device, self._current_stage)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            self.log.error("Worker %s: Redis is unreachable (%s); the stage goes on", self.name, e)
        self._preempt_if_due(job)

    def _preempt_if_due(self, job: Job) -> None:
        """Every monitor tick: let the stage yield to a lighter user's waiting one (stl.jobs.queue.preemption)."""
        after = self.settings.preempt_after_s
        ran = (rq_now() - job.started_at).total_seconds() if job.started_at else 0.0
        if after <= 0 or ran < after:  # the stage started after its job did: it has run less than this
            return
        try:
            chosen = preempt_if_due(self.connection, own_worker=self.name, own_stage=stage_id_for(job.id),
                                    preempt_after_s=after)
        except Exception as e:  # noqa: BLE001 - a failed check must not end the worker; the next tick tries again
            self.log.error("Worker %s: could not check for preemption (%s: %s)", self.name, type(e).__name__, e)
            return
        if chosen is not None:
            self.log.info("Worker %s: asked stage %s of %s (%.0f s since it started) to checkpoint and yield to "
                          "%s's waiting stage (STL_PREEMPT_AFTER=%.0f)", self.name, chosen.stage_id, chosen.user,
                          chosen.ran_s, chosen.for_user, after)

    def _write_record(self, state: str | None) -> None:
        record: dict[FieldT, EncodableT] = {"host": self.host, "heartbeat": time.time(),
                                            "stage": self._current_stage, "paused": self._paused,
                                            "device": self.device, "slot": self.slot, "slots": self.slots,
                                            "sharing": self.sharing,
                                            "waiting": self._admission.waiting if self._admission else ""}
        record.update(self._probe.read())
        space = free_space(self.settings.home)
        if space is not None:
            record["home_free_bytes"], record["home_total_bytes"] = space
        if state is not None:
            record["state"] = state
        try:
            pipe = self.connection.pipeline(transaction=False)
            pipe.sadd(keys.WORKERS, self.name)
            pipe.hset(keys.worker(self.name), mapping=record)
            pipe.expire(keys.worker(self.name), WORKER_RECORD_TTL_S)
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            # What `stl status` shows can wait; the work cannot.
            self.log.error("Worker %s: could not write its status to Redis (%s)", self.name, e)

    def _reap_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_reap < REAP_EVERY_S:
            return
        self._last_reap = now
        try:
            self._reap(now)
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # the dequeue loop waits for Redis
        except Exception:
            # A record the reaper cannot read must not stop the worker: RQ would end its loop.
            self.log.exception("Worker %s: looking for orphaned stages failed; trying again later", self.name)

    def _reap(self, now: float) -> None:
        for stage_id in reap_orphans(self.connection, self.settings):
            self.log.warning("Worker %s: stage %s was orphaned; requeued at the head of its queue",
                             self.name, stage_id)
        # Jobs are dropped only by a worker that dies: look when one has, when starting, and now and then.
        if self._forget_dead_workers() or now - self._last_dropped_scan >= DROPPED_SCAN_EVERY_S or (
                self._dropped and now - self._last_dropped_scan >= DROPPED_CONFIRM_S):
            self._last_dropped_scan = now
            self._requeue_dropped(now)

    def _forget_dead_workers(self) -> bool:
        """Take workers that died without a word (kill -9, lost machine) off the list; True if any."""
        names = sorted(text(n) for n in self.connection.smembers(keys.WORKERS) if text(n) != self.name)
        if not names:
            return False
        pipe = self.connection.pipeline(transaction=False)
        for name in names:
            pipe.exists(keys.worker(name))
        dead = [n for n, alive in zip(names, pipe.execute(), strict=True) if not alive or worker_is_dead(n)]
        if dead:
            self.connection.srem(keys.WORKERS, *dead)
            self.log.warning("Worker %s: worker(s) %s died; looking for the jobs they held", self.name,
                             ", ".join(dead))
        return bool(dead)

    def _requeue_dropped(self, now: float) -> None:
        """Jobs a dead worker took off a queue before RQ recorded them: requeued when seen twice."""
        found = set(find_dropped_jobs(self.connection))
        self._dropped = {sid: self._dropped.get(sid, now) for sid in found}
        for stage_id, since in list(self._dropped.items()):
            if now - since < DROPPED_CONFIRM_S:
                continue
            del self._dropped[stage_id]
            if requeue_orphan(self.connection, self.settings, stage_id, horse_dead=True,
                              reason="its worker died after taking it off the queue"):
                self.log.warning("Worker %s: stage %s was taken off its queue by a worker that died; requeued",
                                 self.name, stage_id)

    def teardown(self) -> None:
        try:
            pipe = self.connection.pipeline(transaction=False)
            pipe.srem(keys.WORKERS, self.name)
            pipe.delete(keys.worker(self.name))
            pipe.execute()
        except redis.RedisError as e:
            self.log.error("Worker %s: could not remove its record from Redis (%s); it expires", self.name, e)
        finally:
            with contextlib.suppress(redis.RedisError):
                super().teardown()


def run_worker(*, connection: redis.Redis, settings: Settings, gpu_index: int | None, burst: bool,
               preload: bool = True, adopt_store: bool = False, slot: int = 1, slots: int = 1) -> bool:
    """Start a worker; returns whether it ran any job. Imports the ML stack once, before forking.
    `adopt_store`: make this STL_HOME the queue's artifact store (stl.jobs.queue.store), its old one being gone.
    `slot` of `slots`: which of the device's slots this worker is (stl.worker.slots starts them)."""
    from stl.jobs.disk_space import check_home_writable
    from stl.jobs.errors import UsageError
    from stl.jobs.queue.notify import notify_setting_problems
    from stl.jobs.queue.records import damaged_records_reported
    from stl.jobs.queue.store import claim_store

    check_home_writable(settings)  # before any job is taken: otherwise every stage would fail on it
    problems = notify_setting_problems(settings.notify_cmd, settings.notify_url)
    if problems:  # said now, not when the first grid ends hours later (and then only in this worker's log)
        raise UsageError("; and ".join(problems))
    # Workers of one queue start stages from each other's models: one STL_HOME, or this worker takes nothing.
    store = claim_store(connection, settings, adopt=adopt_store)
    if adopt_store:
        print(f"stl: STL_HOME {settings.home} (store {store.short}) is the queue's artifact store; models its "
              "stages need that are not in it are made again", flush=True)
    if gpu_index is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_index)
    if preload:
        from stl.jobs.ml.stages import preload_libraries

        preload_libraries()
        # What was just imported lives as long as the worker: out of the collector's sight, the exit does not
        # walk it (seconds of a `--burst` worker's end) and forked horses do not copy its pages by touching it.
        gc.freeze()
    # A record another tool damaged is logged once and skipped: it must not stop the worker (nor its horses).
    with damaged_records_reported(lambda line: logging.getLogger("rq.worker").warning("stl: %s", line)):
        worker = StlWorker(connection=connection, settings=settings, gpu_index=gpu_index, slot=slot, slots=slots)
        ran = worker.work(burst=burst, logging_level="INFO", with_scheduler=False)
    if worker.paused_reason:  # --burst stopped on a broken machine: the queue is not done, and a script must see it
        raise MachineFault(f"the worker stopped with stages still queued: this machine cannot run them "
                           f"({worker.paused_reason}); fix it and start the worker again")
    return ran
