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
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now

from stl.jobs import keys
from stl.jobs.errors import MachineFault
from stl.jobs.faults import parse_faults
from stl.jobs.queue.admission_gate import AdmissionGate
from stl.jobs.queue.dependents import enqueue_ready_dependents
from stl.jobs.queue.devices import device_id, stages_on_device
from stl.jobs.queue.entry import STAGE_ID
from stl.jobs.queue.fairshare import queue_order
from stl.jobs.queue.preemption import preempt_if_due
from stl.jobs.queue.queueing import ENTRY_POINT, LEGACY_ENTRY_POINTS, job_id_for, stage_id_for
from stl.worker.device_memory import device_memory_for, sharing_mode
from stl.worker.gpu import GpuProbe
from stl.worker.machine_health import MachineHealth
from stl.worker.reaper import Reaper
from stl.worker.slots import account_device_share, check_before_work, share_device, slot_worker_name
from stl.worker.stage_endings import StageEndingsWorker
from stl.worker.worker_record import remove_worker_record, write_worker_record

if TYPE_CHECKING:

    from rq.executions import Execution
    from rq.job import Job

    from stl.jobs.settings import Settings

POLL_S = 1  # how long one blocking dequeue waits before the worker looks at new users' queues
# How long the thread that listens for RQ's commands (shutdown, kill-horse, stop-job: rq-dashboard's buttons)
# waits per read. Stopping the worker waits for that read to end: RQ's own 60 s made every exit, `--burst`
# on an empty queue included, hang for up to a minute. Reads that time out cost no Redis command.
COMMAND_POLL_S = 0.5


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


class StlWorker(StageEndingsWorker):
    """RQ's forking worker with fair-share queue order, a safe entry point and preemption."""

    log_result_lifespan = False  # "result is kept for 7776000 seconds" after every stage says nothing useful

    def __init__(self, *, connection: redis.Redis, settings: Settings, gpu_index: int | None,
                 name: str | None = None, slot: int = 1, slots: int = 1) -> None:
        self.settings = settings
        self.gpu_index = gpu_index
        self._probe = GpuProbe(gpu_index)
        self._current_stage = ""
        self._holding_job = False  # from dequeue until the horse is done: a stop must not drop the job
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
        self._reaper = Reaper(connection, settings, worker_name=self.name, log=self.log)
        self._health = MachineHealth(connection, settings, host=host, worker_name=self.name,
                                     has_gpu=self._probe.has_gpu, log=self.log, write_record=self._write_record)
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
        self._write_record("paused" if self._health.paused else "idle")
        idle_since = time.monotonic()
        while True:
            try:
                self.heartbeat()
                if self.should_run_maintenance_tasks:  # as RQ's own loop: its registries are cleaned, idle or not
                    self.run_maintenance_tasks()
                self._reaper.reap_if_due()
                self._refresh_queues()
                enqueue_ready_dependents(self.connection, self.queues, log=self.log, worker_name=self.name)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                self.log.error("Worker %s: Redis is unreachable (%s); retrying in 2 s", self.name, e)
                time.sleep(2)
                continue
            if self._stop_requested:
                return None
            if self._health.paused and not self._health.healthy_again():
                if timeout is None:  # --burst: nothing more can run here now
                    self.log.error("Worker %s: stopping, the machine cannot run stages (%s); queued stages stay "
                                   "queued", self.name, self._health.paused)
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
                    if result is not None or (timeout is None and self._admission.queues_empty
                                              and not self._device_busy()):
                        return result
                    time.sleep(POLL_S)
                    continue
                result = self.queue_class.dequeue_any(
                    self._ordered_queues, None if timeout is None else POLL_S, connection=self.connection,
                    job_class=self.job_class, serializer=self.serializer,
                    death_penalty_class=self.death_penalty_class,
                )
                self._holding_job = result is not None
                if result is not None:
                    return result
                if timeout is None:
                    if not self._device_busy():
                        return None
                    time.sleep(POLL_S)
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

    def _device_busy(self) -> bool:
        """Whether other stages run on this worker's device: a `--burst` slot waits for them rather than quit
        on an empty queue, since a stage that ends releases the stages that depend on it. A slot that has just
        taken a stage joins the device only once its horse starts: an idle device is looked at again a poll later."""
        if stages_on_device(self.connection, self.device):
            return True
        if self.slots <= 1:
            return False
        time.sleep(POLL_S)
        return bool(stages_on_device(self.connection, self.device))

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
        if self._health.host_fault_stops_work():
            # Another worker of this host met a machine fault as this job was taken: it goes back, untried.
            queue._enqueue_job(job, at_front=True)  # noqa: SLF001
            return
        self._current_stage = stage_id_for(job.id)
        self._write_record("busy")
        try:
            super().execute_job(job, queue)
            self._health.pause_if_the_stage_met_a_fault(self._current_stage)
        finally:
            self._current_stage = ""
            self._write_record("paused" if self._health.paused else "idle")

    def monitor_work_horse(self, job: Job, queue: Queue, execution: Execution) -> None:
        """While the horse runs, its stage is in the device's set (stl.jobs.queue.devices): the worker's record
        names the stage from before (execute_job) to after, as stages_on_device wants."""
        with share_device(self.connection, self.device, stage_id_for(job.id), self.log):
            super().monitor_work_horse(job, queue, execution)

    @property
    def paused_reason(self) -> str:
        """Why the machine cannot run stages now (a full disk, a broken GPU); "" when it can."""
        return self._health.paused

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
        write_worker_record(self.connection, self.name, {
            "host": self.host, "stage": self._current_stage, "paused": self._health.paused, "device": self.device,
            "slot": self.slot, "slots": self.slots, "sharing": self.sharing,
            "waiting": self._admission.waiting if self._admission else "", **self._probe.read(),
        }, home=self.settings.home, state=state, log=self.log)

    def teardown(self) -> None:
        remove_worker_record(self.connection, self.name, log=self.log)
        with contextlib.suppress(redis.RedisError):
            super().teardown()


def run_worker(*, connection: redis.Redis, settings: Settings, gpu_index: int | None, burst: bool,
               preload: bool = True, adopt_store: bool = False, slot: int = 1, slots: int = 1) -> bool:
    """Start a worker; returns whether it ran any job. Imports the ML stack once, before forking.
    `adopt_store`: make this STL_HOME the queue's artifact store (stl.jobs.queue.store), its old one being gone.
    `slot` of `slots`: which of the device's slots this worker is (stl.worker.slots starts them)."""
    from stl.jobs.queue.records import damaged_records_reported

    check_before_work(connection, settings, adopt_store=adopt_store)
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
