"""Reporting a running stage's progress: throttled progress and step records, log lines, and the cancel and
preempt flags read between steps."""

from __future__ import annotations

import contextlib
import json
import time
from typing import TYPE_CHECKING

import redis

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.errors import StageLeaseLost
from stl.jobs.layout import LOG_FILE
from stl.jobs.queue.fence import generation_is_current

if TYPE_CHECKING:
    from pathlib import Path

    from stl.jobs.ml.progress import StepReport
    from stl.jobs.queue.stage_lease import StageLease

PROGRESS_EVERY_S = 2.0
LOG_PROGRESS_EVERY_S = 30.0  # a progress line in the stage log (`stl logs -f`), beside the status table's
FLAGS_EVERY_S = 0.2  # a cancel or SIGTERM is read at most this often (one HMGET), between steps or batches
LOG_LINES_KEPT = 5000
STEPS_KEPT = 20_000


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
