"""`stl demo`: a grid end to end (enqueue, a burst worker, results) on a private Redis that only it uses.

Each step is the `stl` command a user would type, run as a child process against the private server; the
server stops when the steps end, whether they finished, failed or were interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

from stl.jobs.queue.private_redis import private_redis

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from pathlib import Path
    from types import FrameType

    from stl.jobs.settings import Settings

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class DemoInterrupted(Exception):
    """A stop signal reached `stl demo`; it stops its step, then its Redis."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class _StopSignals:
    """While armed, a stop signal raises DemoInterrupted; otherwise it is only noted (so stopping Redis is not cut
    short by a second Ctrl+C)."""

    def __init__(self) -> None:
        self.armed = True
        self.received: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum
        if self.armed:
            raise DemoInterrupted(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {signum: signal.signal(signum, self) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def which_redis_line(url: str, data_dir: Path, settings: Settings) -> str:
    """The one line that says which Redis the demo uses, and which it does not."""
    from stl.jobs.queue.connection import describe_url

    ignored = (f"STL_REDIS_URL ({describe_url(settings.redis_url)}) is not used" if settings.redis_url_explicit
               else f"{describe_url(settings.redis_url)} is not used")
    return (f"Redis: a private redis-server on {url} (data in {data_dir}), started for this demo and stopped when "
            f"it ends; {ignored}")


def step_environment(environ: Mapping[str, str], redis_url: str, home: Path) -> dict[str, str]:
    """The environment of the demo's `stl` steps: its private Redis and STL_HOME, and one torch thread unless
    OMP_NUM_THREADS says otherwise. The demo's tiny models gain nothing from a second thread and lose much when the
    cores are shared: on a 2-core machine with one core busy elsewhere, torch's default made the demo take 289 s
    instead of 106 s (BENCHMARKS.md, row 27)."""
    return {"OMP_NUM_THREADS": "1", **environ, "STL_REDIS_URL": redis_url, "STL_HOME": str(home)}


def run_demo(grid: Path, grid_name: str, settings: Settings, say: Callable[[str], None],
             results_options: Sequence[str] = ()) -> int:
    """Run the grid's steps on a private Redis under STL_HOME; the exit code of the first step that failed, 0 when
    all passed, or 128 + the signal when one stopped the demo. `results_options` go to `stl results` (an effect)."""
    stop_signals = _StopSignals()
    code = 0
    say = _quiet_on_a_lost_terminal(say)
    with stop_signals.installed():
        try:
            with private_redis(settings.home) as server:
                try:
                    say(which_redis_line(server.url, server.data_dir, settings))
                    env = step_environment(os.environ, server.url, settings.home)
                    steps = (["enqueue", str(grid)], ["worker", "--burst"], ["results", grid_name, *results_options])
                    code = _run_steps(steps, env, stop_signals, say)
                except DemoInterrupted:
                    pass
                finally:
                    stop_signals.armed = False  # from here on, a signal must not cut stopping Redis short
            say(f"stopped the private redis-server; the demo's runs stay in {settings.home} "
                "(run the demo again to see them at once)")
        except DemoInterrupted:  # a signal while the server started: private_redis stopped it
            pass
    return 128 + stop_signals.received if stop_signals.received is not None else code


def _run_steps(steps: Sequence[list[str]], env: dict[str, str], stop_signals: _StopSignals,
               say: Callable[[str], None]) -> int:
    for step in steps:
        code = _run_step(step, env, stop_signals, say)
        if code != 0 or stop_signals.received is not None:
            return code
    return 0


def _run_step(args: list[str], env: dict[str, str], stop_signals: _StopSignals, say: Callable[[str], None]) -> int:
    """One `stl` command as a child process, in a session of its own: a stop signal reaches it once, from here, so a
    worker gets one SIGTERM (checkpoint and put the stage back) and not a second one (which kills its stage)."""
    child: subprocess.Popen[bytes] | None = None
    interrupts = 0
    while True:
        try:
            if stop_signals.received is not None and child is None:
                return 128 + stop_signals.received
            if child is None:
                child = subprocess.Popen([sys.executable, "-m", "stl.cli.main", *args], env=env, start_new_session=True)
            return child.wait()
        except DemoInterrupted:
            if child is None:
                continue
            interrupts += 1
            if interrupts <= 2:  # RQ's second signal: the work horse is killed, not waited for
                child.send_signal(signal.SIGTERM)
            else:
                child.kill()
            if interrupts == 1:
                say(f"stopping: `stl {args[0]}` finishes its part first (a worker puts its stage back); "
                    "interrupt again to stop it at once")


def _quiet_on_a_lost_terminal(say: Callable[[str], None]) -> Callable[[str], None]:
    """`say`, except that a terminal gone away (SIGHUP, then EIO on write) does not stop the demo's clean-up."""

    def said(line: str) -> None:
        with contextlib.suppress(OSError):
            say(line)

    return said
