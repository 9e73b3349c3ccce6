"""`stl worker --slots N`: up to N stages at once on one device, each in its own slot worker.

The `stl worker` process becomes a small supervisor that never imports torch: it starts N slot processes
(`stl worker-slot`, hidden), each a normal StlWorker with its own work horse, forwards SIGTERM and SIGINT to
them (each checkpoints its stage and puts it back at the head of its queue), and starts again a slot that
died unexpectedly. With `--burst` it ends when every slot has ended.

On a CPU the cores are split between the slots: each gets max(1, cores // N) threads (OMP_NUM_THREADS, unless
the user set it), so N stages at once compute what they compute one at a time.

This module also holds the few steps a slot worker takes for its device (stl.jobs.queue.devices).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis

from stl.jobs.queue.devices import accrue_device_share, join_device, leave_device

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable, Iterator
    from types import FrameType

    from stl.jobs.settings import Settings

BURST_DONE = (0, 1)  # a --burst slot that exits so has ended its work: the queue is empty, or the machine is broken
FAST_EXIT_S = 30.0  # a slot that dies this soon after its start, again and again, cannot start at all
FAST_EXITS_GIVEN_UP = 5
RESTART_DELAY_MAX_S = 30.0
POLL_S = 0.5
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_PR_SET_PDEATHSIG = 1


def slot_worker_name(host: str, device: str, slot: int, slots: int, pid: int) -> str:
    """"<host>.gpu0.<pid>" for a worker of one slot; "<host>.gpu0.s2.<pid>" for slot 2 of several."""
    return f"{host}.{device}.{pid}" if slots == 1 else f"{host}.{device}.s{slot}.{pid}"


def threads_per_slot(cores: int, slots: int) -> int:
    return max(1, cores // slots)


def cpu_slots_warning(slots: int, cores: int) -> str:
    """What to tell a user who asks for more CPU slots than cores: the stages would take turns, only slower."""
    if slots <= cores:
        return ""
    return (f"warning: {slots} slots share {cores} cores, so their stages take turns on them and the grid takes "
            f"longer than with --slots {max(cores, 1)} (measured on 2 cores: 4 slots 1.4x the wall time of 1)")


def slot_environment(environ: dict[str, str], *, slots: int, on_cpu: bool, cores: int) -> dict[str, str]:
    """A slot process's environment: on a CPU, its share of the cores, unless the user set OMP_NUM_THREADS."""
    env = dict(environ)
    if on_cpu and slots > 1 and not environ.get("OMP_NUM_THREADS"):
        threads = str(threads_per_slot(cores, slots))
        env.update(dict.fromkeys(THREAD_VARIABLES, threads))
    return env


def slot_command(slot: int, slots: int, *, gpu_index: int | None, burst: bool) -> list[str]:
    return [sys.executable, "-m", "stl.cli.main", "worker-slot", "--slot", str(slot), "--slots", str(slots),
            *(["--gpu", str(gpu_index)] if gpu_index is not None else []), *(["--burst"] if burst else [])]


def _die_with_the_supervisor() -> None:
    """In the slot process, before it runs stl: SIGTERM (checkpoint and requeue) when the supervisor dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Slot:
    number: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    fast_exits: int = 0
    restart_at: float | None = None  # when to start it again after it died
    exit_code: int | None = None  # once it has ended for good


@dataclass
class SlotSupervisor:
    """Starts, watches and stops the slot processes of one device."""

    slots: int
    burst: bool
    command: Callable[[int], list[str]]  # the command line of slot n (1..slots)
    env: dict[str, str]
    say: Callable[[str], None]
    children: list[Slot] = field(default_factory=list)
    stopping: bool = False

    def start(self, slot: Slot) -> None:
        # Its own process group: a Ctrl+C at the terminal reaches the supervisor alone, which passes it on once
        # (a second SIGINT would make a slot kill its horse without a checkpoint).
        slot.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            self.command(slot.number), env=self.env,
            process_group=0, preexec_fn=_die_with_the_supervisor)  # noqa: PLW1509 - prctl only, no locks
        slot.started, slot.restart_at = time.monotonic(), None

    def forward(self, signum: int, _frame: FrameType | None = None) -> None:
        if not self.stopping:
            self.say(f"stopping: passing {signal.Signals(signum).name} to {self.slots} slot worker(s); each "
                     "running stage checkpoints and goes back to the head of its queue")
        self.stopping = True
        for slot in self.children:
            if slot.process is not None and slot.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signum)

    def run(self) -> int:
        """Until every slot has ended: the exit status, 0 if every slot's was."""
        self.children = [Slot(n) for n in range(1, self.slots + 1)]
        for slot in self.children:
            self.start(slot)
        while any(slot.exit_code is None for slot in self.children):
            time.sleep(POLL_S)
            for slot in self.children:
                self._watch(slot)
        return next((slot.exit_code for slot in self.children if slot.exit_code), 0)

    def _watch(self, slot: Slot) -> None:
        now = time.monotonic()
        if slot.exit_code is not None:
            return
        if slot.restart_at is not None:
            if self.stopping:
                slot.exit_code = 0
            elif now >= slot.restart_at:
                self.start(slot)
            return
        assert slot.process is not None
        code = slot.process.poll()
        if code is None:
            return
        if self.stopping or (self.burst and code in BURST_DONE):
            slot.exit_code = code
            return
        slot.fast_exits = slot.fast_exits + 1 if now - slot.started < FAST_EXIT_S else 0
        if slot.fast_exits >= FAST_EXITS_GIVEN_UP:
            self.say(f"slot {slot.number} exited with status {code} {slot.fast_exits} times in a row within "
                     f"{FAST_EXIT_S:.0f} s of its start; giving up on it (its log above says why)")
            slot.exit_code = code or 1
            return
        delay = min(RESTART_DELAY_MAX_S, 2.0 ** slot.fast_exits - 1)
        self.say(f"slot {slot.number} (pid {slot.process.pid}) died unexpectedly (exit status {code}); starting "
                 f"it again{f' in {delay:.0f} s' if delay else ''}")
        slot.restart_at = now + delay


def check_before_work(conn: redis.Redis, settings: Settings, *, adopt_store: bool) -> None:
    """What a worker checks before it takes any stage (stl.worker.main.run_worker); `stl worker --slots N`
    checks once before its slots start, so a problem is said once and `--adopt-store` adopts once."""
    from stl.jobs.disk_space import check_home_writable
    from stl.jobs.errors import UsageError
    from stl.jobs.queue.notify import notify_setting_problems
    from stl.jobs.queue.store import claim_store

    check_home_writable(settings)  # otherwise every stage it takes would fail on it
    problems = notify_setting_problems(settings.notify_cmd, settings.notify_url)
    if problems:  # said now, not when the first grid ends hours later (and then only in this worker's log)
        raise UsageError("; and ".join(problems))
    # Workers of one queue start stages from each other's models: one STL_HOME, or this worker takes nothing.
    store = claim_store(conn, settings, adopt=adopt_store)
    if adopt_store:
        print(f"stl: STL_HOME {settings.home} (store {store.short}) is the queue's artifact store; models its "
              "stages need that are not in it are made again", flush=True)


def run_slots(*, slots: int, gpu_index: int | None, burst: bool, on_cpu: bool,
              say: Callable[[str], None]) -> int:
    """Run `slots` slot workers of one device until they end (`--burst`) or a signal stops them."""
    cores = len(os.sched_getaffinity(0))
    env = slot_environment(dict(os.environ), slots=slots, on_cpu=on_cpu, cores=cores)
    threads = env.get("OMP_NUM_THREADS") or "torch's default"
    say(f"{slots} slots on {'the CPU' if on_cpu else f'GPU {gpu_index or 0}'}, each a worker with its own work "
        f"horse" + (f"; {threads} thread(s) each of {cores} cores" if on_cpu else ""))
    crowded = cpu_slots_warning(slots, cores) if on_cpu else ""
    if crowded:
        say(crowded)
    supervisor = SlotSupervisor(slots=slots, burst=burst, env=env, say=say,
                                command=lambda n: slot_command(n, slots, gpu_index=gpu_index, burst=burst))
    previous = {s: signal.signal(s, supervisor.forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return supervisor.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- in each slot worker ----------------------------------------------------------------------------


@contextlib.contextmanager
def share_device(conn: redis.Redis, device: str, stage_id: str, log: logging.Logger) -> Iterator[None]:
    """While a horse runs `stage_id`: the stage is in its device's set (out again however the horse ends)."""
    try:
        join_device(conn, device, stage_id)
    except redis.RedisError as e:  # the next heartbeat adds it
        log.error("stl: could not record stage %s on device %s (%s)", stage_id, device, e)
    try:
        yield
    finally:
        try:
            leave_device(conn, device, stage_id)
        except redis.RedisError as e:  # its entry is left out by readers once this worker's record names no stage
            log.error("stl: could not take stage %s off device %s (%s)", stage_id, device, e)


def account_device_share(conn: redis.Redis, device: str, stage_id: str) -> None:
    """On the worker's heartbeat while its horse runs: the stage is on the device, and gets its share."""
    if not stage_id:
        return
    with contextlib.suppress(redis.RedisError, ValueError):
        join_device(conn, device, stage_id)
        accrue_device_share(conn, stage_id, device, time.time())
