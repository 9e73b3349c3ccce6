"""The worker as an RQ worker: it exits at once, still takes RQ's commands, keeps RQ's maintenance running,
and overrides only internals of the RQ major version pyproject.toml pins."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
import tomllib
from typing import TYPE_CHECKING, Any

import pytest
import rq
from rq.command import PUBSUB_CHANNEL_TEMPLATE, send_shutdown_command
from rq.job import Job
from rq.queue import Queue
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.settings import load_settings
from stl.worker.main import StlWorker
from tests.conftest import REPO
from tests.helpers import Workers, child_env, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    import redis

# A --burst worker's end is its last log line to its exit: imports and start-up are the machine's speed, not this.
# RQ's own command listener made this up to a minute; a loaded 2-core box needs a few seconds at worst.
EXIT_WITHIN_S = 10.0



def _burst_on_an_empty_queue() -> tuple[float, str]:
    """Seconds from the worker's "done, quitting" to its exit, and its output."""
    process = subprocess.Popen([sys.executable, "-m", "stl.cli.main", "worker", "--burst"], cwd=REPO, env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines, done_at = [], None
    try:
        for line in process.stdout:  # until the worker closes its output, i.e. exits
            lines.append(line)
            if "done, quitting" in line:
                done_at = time.monotonic()
        process.wait(timeout=EXIT_WITHIN_S)
    finally:
        process.kill()
    exited_at = time.monotonic()
    output = "".join(lines)
    assert process.returncode == 0, output
    assert done_at is not None, output
    return exited_at - done_at, output


@pytest.mark.slow
def test_a_burst_worker_on_an_empty_queue_exits_at_once_five_times_in_a_row(stl_env: Path,
                                                                            conn: redis.Redis) -> None:
    took = []
    for _ in range(5):
        seconds, output = _burst_on_an_empty_queue()
        took.append(round(seconds, 1))
        assert seconds < EXIT_WITHIN_S, f"exits took {took} s after 'done, quitting'\n{output}"
    print(f"--burst exits after 'done, quitting': {took} s")
    assert conn.scard(keys.WORKERS) == 0  # each took its record with it


@pytest.mark.slow
def test_an_idle_worker_stops_at_once_on_sigterm_and_on_rqs_shutdown_command(stl_env: Path, conn: redis.Redis,
                                                                             workers: Workers) -> None:
    # SIGTERM is what `docker stop` sends, SIGKILL following 10 s later; the shutdown command is rq-dashboard's
    # button, on the channel the quicker listener reads: it must still be heard.
    by_signal, by_command = workers.start(), workers.start()
    names = {}
    for worker in (by_signal, by_command):
        names[worker.pid] = wait_for(lambda w=worker: next((text(n) for n in conn.smembers(keys.WORKERS)
                                                            if text(n).endswith(f".{w.pid}")), None),
                                     timeout=120, what="the workers to register", diagnostics=workers.logs)
        channel = PUBSUB_CHANNEL_TEMPLATE % names[worker.pid]
        wait_for(lambda c=channel: dict(conn.pubsub_numsub(c)).get(c.encode()), timeout=30,
                 what="the workers to listen for RQ's commands", diagnostics=workers.logs)
    time.sleep(2)  # both in their idle loops
    sent = time.monotonic()
    os.kill(by_signal.pid, signal.SIGTERM)
    send_shutdown_command(conn, names[by_command.pid])
    for worker in (by_signal, by_command):
        assert worker.wait(timeout=90) == 0, workers.logs()
        took = time.monotonic() - sent
        assert took < EXIT_WITHIN_S, f"worker {names[worker.pid]} took {took:.1f} s to stop\n{workers.logs()}"
        assert not conn.sismember(keys.WORKERS, names[worker.pid])
    assert "Received shutdown command" in by_command.output(), workers.logs()


def test_the_worker_keeps_rqs_registry_maintenance_running_while_it_waits_for_work(
        stl_env: Path, conn: redis.Redis) -> None:
    conn.sadd(keys.USERS, "alice")
    worker = StlWorker(connection=conn, settings=load_settings(), gpu_index=None)
    worker.maintenance_interval = 1  # RQ's is ten minutes; the cadence is RQ's own rule either way
    worker.last_cleaned_at = cleaned = rq_now()  # as just after the worker's start
    queue = Queue(keys.queue_name("alice", "normal"), connection=conn, serializer=JSONSerializer)
    failed = FailedJobRegistry(queue=queue)
    job = Job.create("stl.jobs.queue.entry.run_stage", args=["0" * 20], connection=conn, serializer=JSONSerializer)
    job.save()
    conn.zadd(failed.key, {job.id: time.time() - 60})  # kept for its TTL, which ran out a minute ago
    assert worker.dequeue_job_and_maintain_ttl(timeout=5, max_idle_time=3) is None  # idle: no work
    assert worker.last_cleaned_at is not None and worker.last_cleaned_at > cleaned
    assert conn.zcard(failed.key) == 0, "RQ's failed-job registry was not cleaned while the worker was idle"


def test_rq_is_pinned_to_the_major_version_whose_internals_the_worker_overrides() -> None:
    from packaging.requirements import Requirement
    from packaging.version import Version

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (specifier,) = [Requirement(d).specifier for d in dependencies if Requirement(d).name == "rq"]
    installed = Version(rq.__version__)
    assert installed in specifier, (installed, str(specifier))
    major = installed.major
    assert Version(f"{major}.0") in specifier
    assert Version(f"{major - 1}.99") not in specifier and Version(f"{major + 1}.0") not in specifier, str(specifier)


def _calls_from(signature: inspect.Signature) -> list[tuple[list[Any], dict[str, Any]]]:
    """The ways a caller may call a method of this signature: by position, by keyword, with only what it needs."""
    params = [p for p in signature.parameters.values() if p.name != "self"]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword_only = [p for p in params if p.kind == p.KEYWORD_ONLY]
    extra = [object()] * 3 if any(p.kind == p.VAR_POSITIONAL for p in params) else []  # handle_exception(job, *exc)
    required = [p for p in positional if p.default is p.empty]
    calls: list[tuple[list[Any], dict[str, Any]]] = [
        ([p.name for p in positional] + extra, {p.name: p.name for p in keyword_only}),
        ([p.name for p in positional if p.kind == p.POSITIONAL_ONLY],
         {p.name: p.name for p in [*positional, *keyword_only] if p.kind != p.POSITIONAL_ONLY}),
        ([p.name for p in required] + extra, {p.name: p.name for p in keyword_only if p.default is p.empty}),
    ]
    return [(args, kwargs) for args, kwargs in calls if _binds(signature, args, kwargs)]


def _binds(signature: inspect.Signature, args: list[Any], kwargs: dict[str, Any]) -> bool:
    try:
        signature.bind(None, *args, **kwargs)
    except TypeError:
        return False
    return True


def _incompatibilities(caller: inspect.Signature, callee: inspect.Signature) -> list[str]:
    """Calls shaped by `caller` that `callee` refuses, or binds to parameters of other names."""
    takes_anything = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in callee.parameters.values())
    problems = []
    for args, kwargs in _calls_from(caller):
        try:
            bound = callee.bind(None, *args, **kwargs)
        except TypeError as e:
            problems.append(f"({', '.join(map(str, args))}, {kwargs}): {e}")
            continue
        if takes_anything:
            continue
        for name, value in bound.arguments.items():
            if isinstance(value, str) and value != name:
                problems.append(f"{value!r} is passed where {name!r} is taken")
    return problems


def test_every_rq_method_the_worker_overrides_exists_in_rq_with_a_compatible_signature() -> None:
    ours = [cls for cls in StlWorker.__mro__ if cls.__module__.startswith("stl.")]  # StlWorker and its parts
    overridden = {name: member for cls in reversed(ours) for name, member in vars(cls).items()
                  if inspect.isfunction(member) and name != "__init__" and hasattr(rq.Worker, name)}
    # What the worker must override to work at all: a renamed one in a new RQ would silently stop being called.
    assert {"dequeue_job_and_maintain_ttl", "_finalize_failure", "execute_job", "handle_job_failure",
            "handle_work_horse_killed", "subscribe", "request_stop", "_shutdown", "teardown"} <= set(overridden)
    problems = {}
    for name, member in overridden.items():
        ours, theirs = inspect.signature(member), inspect.signature(getattr(rq.Worker, name))
        found = [f"RQ calls it {p}" for p in _incompatibilities(theirs, ours)]
        found += [f"ours calls RQ's {p}" for p in _incompatibilities(ours, theirs)]
        if found:
            problems[name] = found
    assert not problems, problems


def test_the_rq_internals_the_worker_calls_take_what_it_passes() -> None:
    # Not overridden, but called by name from StlWorker: a change in RQ must fail here, not in a stage.
    def takes(function: Any, *args: str, **kwargs: str) -> None:
        inspect.signature(function).bind(None, *args, **kwargs)

    takes(rq.Worker.cleanup_execution, "job", pipeline="pipe", execution="execution")
    takes(rq.Worker.handle_execution_ended, "job", "queue", "timeout")
    takes(rq.Worker.run_maintenance_tasks)
    takes(rq.Worker._pubsub_exception_handler, "exc", "pubsub", "pubsub_thread")  # noqa: SLF001
    takes(rq.Worker.handle_payload, "message")
    takes(Queue._enqueue_job, "job", pipeline="pipe", at_front="yes")  # noqa: SLF001
    inspect.signature(Queue.dequeue_any).bind("queues", "timeout", connection="c", job_class="j", serializer="s",
                                              death_penalty_class="d")  # a class method: no instance to pass
    takes(Job._handle_failure, "exc_string", pipeline="pipe", worker_name="name")  # noqa: SLF001
    assert isinstance(rq.Worker.should_run_maintenance_tasks, property)
    assert isinstance(rq.Worker.pubsub_channel_name, property)
    inspect.signature(rq.Worker.__init__).bind(None, ["queue"], name="n", connection="c", serializer="s",
                                               job_monitoring_interval=5)
