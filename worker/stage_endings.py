"""How a stage's job ends in the worker: refused before it runs, stopped by SIGTERM, or through RQ's end-of-job
hooks. RQ's hooks: an expected ending gets one log line, not a traceback; a preempted stage, or one the machine
failed, goes back to the head of its queue; a dead horse's stage resumes from its checkpoint; a horse killed for
running past its time limit fails its stage."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import redis
from rq import Worker
from rq.job import JobStatus
from rq.utils import now as rq_now

from stl.jobs import keys
from stl.jobs.errors import MachineFault, StageLeaseLost, StagePreempted, StageWaitsForParent, StlError
from stl.jobs.queue.queueing import stage_id_for
from stl.jobs.queue.recovery import fail_stage, requeue_orphan

if TYPE_CHECKING:
    from types import TracebackType

    from rq import Queue
    from rq.executions import Execution
    from rq.job import Job

    from stl.jobs.settings import Settings

# Delete a lease only if the given (dead) horse holds it.
_DROP_LEASE_OF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class StageEndingsWorker(Worker):
    """The part of StlWorker that ends jobs (worker/main.py sets the fields below)."""

    settings: Settings
    host: str
    _current_stage = ""  # the stage its horse runs now
    _holding_job = False  # from dequeue until the horse is done: a stop must not drop the job
    _pending_orphan = ""  # the stage whose horse died: requeued once RQ has recorded the failure
    _pending_timeout = ""  # the stage whose horse was killed past its time limit: failed likewise

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

    def _refuse(self, job: Job, queue: Queue, message: str) -> None:
        self.log.error("Worker %s: %s", self.name, message)
        with self.connection.pipeline() as pipe:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            job._handle_failure(message, pipeline=pipe, worker_name=self.name)  # noqa: SLF001
            pipe.execute()

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
