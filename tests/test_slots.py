"""`stl worker --slots N`: slot naming and the CPU thread split, the device's set of running stages, fair
share by share of the device, the slots in `stl status`, and identical results with two slots on the CPU."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from rich.console import Console

from stl.cli.render import build_slots_table, slot_rows
from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.queue import entry
from stl.jobs.queue.devices import accrue_device_share, settle_device_seconds, stages_on_device
from stl.jobs.queue.fairshare import decayed_usage, users_by_usage
from stl.jobs.queue.records import WorkerRow
from stl.jobs.queue.recovery import worker_is_dead
from stl.jobs.queue.run_results import read_results
from stl.worker.slots import (
    SlotSupervisor,
    cpu_slots_warning,
    slot_command,
    slot_environment,
    slot_worker_name,
    threads_per_slot,
)
from tests.helpers import (
    Workers,
    child_env,
    enqueue,
    grid_done,
    small_grid,
    stage_log,
    status_json,
    stl,
    wait_for,
)

if TYPE_CHECKING:
    from pathlib import Path

    import redis

DEVICE = "box:gpu0"


def test_slot_workers_are_named_by_device_and_slot() -> None:
    assert slot_worker_name("box", "gpu0", 1, 1, 42) == "box.gpu0.42"  # one slot: the name of today
    assert slot_worker_name("box", "gpu0", 2, 4, 42) == "box.gpu0.s2.42"
    assert slot_worker_name("lap", "cpu", 1, 2, 7) == "lap.cpu.s1.7"
    command = slot_command(2, 3, gpu_index=1, burst=True)
    assert command[:3] == [sys.executable, "-m", "stl.cli.main"]
    assert command[3:] == ["worker-slot", "--slot", "2", "--slots", "3", "--gpu", "1", "--burst"]
    assert slot_command(1, 2, gpu_index=None, burst=False)[3:] == ["worker-slot", "--slot", "1", "--slots", "2"]


def test_a_dead_slot_worker_of_this_host_is_known_dead_by_its_name() -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid, host = int(gone.stdout), socket.gethostname()
    for slot, slots in ((1, 1), (2, 4)):
        assert worker_is_dead(slot_worker_name(host, "gpu0", slot, slots, dead_pid))
        assert not worker_is_dead(slot_worker_name(host, "gpu0", slot, slots, os.getpid()))
        assert not worker_is_dead(slot_worker_name("elsewhere", "gpu0", slot, slots, dead_pid))  # not ours to say


def test_cpu_slots_split_the_cores_unless_the_user_chose_threads() -> None:
    assert [threads_per_slot(16, n) for n in (1, 2, 3, 4, 32)] == [16, 8, 5, 4, 1]
    # More slots than cores: said at start, with the slot count that fits.
    assert cpu_slots_warning(2, 2) == "" and "--slots 2" in cpu_slots_warning(4, 2)
    env = slot_environment({"PATH": "/bin"}, slots=4, on_cpu=True, cores=16)
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    assert slot_environment({"OMP_NUM_THREADS": "3"}, slots=4, on_cpu=True, cores=16) == {"OMP_NUM_THREADS": "3"}
    assert slot_environment({}, slots=4, on_cpu=False, cores=16) == {}  # a GPU's horses: torch's own default
    assert slot_environment({}, slots=1, on_cpu=True, cores=16) == {}  # one slot: as `stl worker` was


def test_the_help_of_worker_and_status_documents_slots() -> None:
    worker, status = stl("worker", "--help"), stl("status", "--help")
    assert worker.returncode == status.returncode == 0, worker.stderr + status.stderr
    assert "--slots" in worker.stdout and "MPS or time-slicing" in worker.stdout
    assert "Slots table" in status.stdout
    # A help paragraph out of step with the docstring's indentation is printed with runs of spaces inside it.
    assert not [line for line in worker.stdout.splitlines() if "   " in line.strip() and "--" not in line]

def _supervise(tmp_path: Path, script: str, *, slots: int = 2, burst: bool = True,
               stop_once_up: bool = False) -> tuple[int, list[str]]:
    """Run a SlotSupervisor whose slots run `script` (argv[1]: the slot's number, argv[2]: a folder);
    `stop_once_up`: SIGTERM once every slot has written up-<n> there."""
    said: list[str] = []
    supervisor = SlotSupervisor(slots=slots, burst=burst, env=dict(os.environ), say=said.append,
                                command=lambda n: [sys.executable, "-c", script, str(n), str(tmp_path)])

    def stop_once_all_are_up() -> None:
        wait_for(lambda: len(list(tmp_path.glob("up-*"))) == slots, timeout=60, what="the slots to start")
        supervisor.forward(signal.SIGTERM)

    if stop_once_up:
        threading.Thread(target=stop_once_all_are_up, daemon=True).start()
    return supervisor.run(), said


def test_the_supervisor_starts_again_a_slot_that_died(tmp_path: Path) -> None:
    # Slot 2 is killed the first time it runs (as by the OOM killer); both end their work the second.
    script = ("import os, pathlib, signal, sys; n, d = sys.argv[1], pathlib.Path(sys.argv[2]); "
              "mark = d / f'ran-{n}'; first = not mark.exists(); mark.touch(); "
              "os.kill(os.getpid(), signal.SIGKILL) if n == '2' and first else sys.exit(0)")
    code, said = _supervise(tmp_path, script)
    assert code == 0
    assert [line.split(" (pid")[0] for line in said] == ["slot 2"]
    assert "died unexpectedly (exit status -9); starting it again" in said[0]


def test_a_burst_slot_that_cannot_run_the_queue_makes_the_supervisor_fail(tmp_path: Path) -> None:
    script = "import sys; sys.exit(1 if sys.argv[1] == '1' else 0)"  # slot 1: the machine is broken
    assert _supervise(tmp_path, script) == (1, [])


def test_the_supervisor_passes_sigterm_on_and_starts_nothing_again(tmp_path: Path) -> None:
    script = ("import pathlib, signal, sys, time; d = pathlib.Path(sys.argv[2]); "
              "signal.signal(signal.SIGTERM, lambda *a: ((d / f'stopped-{sys.argv[1]}').touch(), sys.exit(0))); "
              "(d / f'up-{sys.argv[1]}').touch(); time.sleep(60)")  # up: its handler is set
    started = time.monotonic()
    code, said = _supervise(tmp_path, script, burst=False, stop_once_up=True)
    assert code == 0 and time.monotonic() - started < 30
    assert sorted(p.name for p in tmp_path.glob("stopped-*")) == ["stopped-1", "stopped-2"]
    assert said == ["stopping: passing SIGTERM to 2 slot worker(s); each running stage checkpoints and goes "
                    "back to the head of its queue"]


def _running(conn: redis.Redis, stage_id: str, *, at: float, user: str = "alice") -> None:
    conn.hset(keys.stage(stage_id), mapping={"status": "running", "user": user, "started_at": at, "heartbeat": at,
                                             "device": DEVICE, "device_seconds": 0, "device_accounted_at": at})
    conn.sadd(keys.RUNNING_STAGES, stage_id)
    conn.sadd(keys.USERS, user)
    conn.sadd(keys.device_stages(DEVICE), stage_id)


def _slot_worker(conn: redis.Redis, name: str, stage_id: str) -> None:
    """The record of a live slot worker of DEVICE whose horse runs `stage_id` ("" for none)."""
    conn.sadd(keys.WORKERS, name)
    conn.hset(keys.worker(name), mapping={"device": DEVICE, "stage": stage_id, "heartbeat": time.time()})


def test_stages_sharing_a_device_are_each_charged_their_share(conn: redis.Redis) -> None:
    a, b = "a" * 20, "b" * 20
    _running(conn, a, at=1000.0)
    _running(conn, b, at=1000.0, user="bob")
    _slot_worker(conn, "box.gpu0.s1.1", a)
    _slot_worker(conn, "box.gpu0.s2.2", b)
    assert stages_on_device(conn, DEVICE) == [a, b]
    # 1000-1020: both on the device, each charged half; heartbeats every 10 s.
    assert accrue_device_share(conn, a, DEVICE, 1010.0) == pytest.approx(5.0)
    assert accrue_device_share(conn, b, DEVICE, 1010.0) == pytest.approx(5.0)
    assert accrue_device_share(conn, a, DEVICE, 1020.0) == pytest.approx(10.0)
    # b ends at 1020: its charge is its share, 10 s of 20 s on the device.
    conn.hset(keys.stage(b), "status", "finished")
    entry._charge(conn, "bob", b, 1000.0, 1020.0)  # noqa: SLF001 - the charge every way a stage ends takes
    assert decayed_usage(conn.hget(keys.USAGE, "bob"), 1020.0) == pytest.approx(10.0)
    assert accrue_device_share(conn, b, DEVICE, 1030.0) is None  # its account ended with its charge
    conn.srem(keys.device_stages(DEVICE), b)
    _slot_worker(conn, "box.gpu0.s2.2", "")
    # 1020-1040: a alone, charged in full; while it runs, fair share counts its share to its heartbeat.
    assert accrue_device_share(conn, a, DEVICE, 1030.0) == pytest.approx(20.0)
    conn.hset(keys.stage(a), "heartbeat", 1035.0)
    assert dict(users_by_usage(conn, now=1035.0))["alice"] == pytest.approx(25.0)
    conn.hset(keys.stage(a), "status", "finished")
    entry._charge(conn, "alice", a, 1000.0, 1040.0)  # noqa: SLF001
    assert decayed_usage(conn.hget(keys.USAGE, "alice"), 1040.0) == pytest.approx(30.0)
    # The device's 40 s went, whole, to the two stages that shared it.
    assert float(conn.hget(keys.stage(a), "device_seconds")) + float(conn.hget(keys.stage(b), "device_seconds")) \
        == pytest.approx(40.0)


def test_a_stage_alone_on_its_device_is_charged_its_wall_time(conn: redis.Redis) -> None:
    c = "c" * 20
    _running(conn, c, at=2000.0)
    _slot_worker(conn, "box.gpu0.1", c)
    for t in (2003.0, 2008.5, 2013.25):
        accrue_device_share(conn, c, DEVICE, t)
    assert settle_device_seconds(conn, c, 2017.75) == pytest.approx(17.75, abs=1e-5)


def test_a_dead_workers_stage_leaves_the_device_set_when_read(conn: redis.Redis) -> None:
    live, dead, other = "d" * 20, "e" * 20, "f" * 20
    conn.sadd(keys.device_stages(DEVICE), live, dead, other)
    _slot_worker(conn, "box.gpu0.s1.1", live)
    conn.sadd(keys.WORKERS, "box.gpu0.s2.2")  # its record expired: the worker died (kill -9)
    conn.sadd(keys.WORKERS, "elsewhere.gpu0.3")
    conn.hset(keys.worker("elsewhere.gpu0.3"), mapping={"device": "elsewhere:gpu0", "stage": other})
    assert stages_on_device(conn, DEVICE) == [live]
    assert {text(s) for s in conn.smembers(keys.device_stages(DEVICE))} == {live}


def _worker_row(name: str, **fields: Any) -> WorkerRow:
    return WorkerRow(name=name, host="box", gpu="NVIDIA H100", gpu_util=50.0, gpu_mem_used_mb=1024.0,
                     gpu_mem_total_mb=81920.0, state=fields.pop("state", "busy"), stage=fields.pop("stage", ""),
                     last_seen=time.time(), **fields)


def test_status_shows_each_devices_slots_and_why_a_stage_waits() -> None:
    single = _worker_row("lap.cpu.9", device="lap:cpu")
    slot2 = _worker_row("box.gpu0.s2.12", device="box:gpu0", slot=2, slots=2, state="idle",
                        waiting="stage 3f9a needs 9.0 GB, 6.1 GB free [bold]")
    slot1 = _worker_row("box.gpu0.s1.11", device="box:gpu0", slot=1, slots=2, stage="abcdef0123456789")
    other = _worker_row("box.gpu1.s1.13", device="box:gpu1", slot=1, slots=2, state="idle")
    rows = slot_rows([single, slot2, other, slot1])
    assert rows == [
        ["box:gpu0", "1/2", "box.gpu0.s1.11", "busy", "abcdef012345", ""],
        ["box:gpu0", "2/2", "box.gpu0.s2.12", "idle", "—", "stage 3f9a needs 9.0 GB, 6.1 GB free [bold]"],
        ["box:gpu1", "1/2", "box.gpu1.s1.13", "idle", "—", ""],
    ]
    table = build_slots_table([single, slot2, other, slot1])
    assert table is not None
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    assert "6.1 GB free [bold]" in console.export_text()  # the reason as written, never markup
    assert build_slots_table([single]) is None  # one stage at a time everywhere: no slots table
    waiting_alone = _worker_row("lap.cpu.9", device="lap:cpu", waiting="stage 1 needs 2.0 GB, 1.0 GB free")
    assert slot_rows([waiting_alone])[0][5] == "stage 1 needs 2.0 GB, 1.0 GB free"


def _results_by_seed(conn: redis.Redis, grid: str) -> dict[int, Any]:
    run_ids = [text(r) for r in conn.zrange(keys.grid_runs(grid), 0, -1)]
    seeds = [json.loads(text(conn.hget(keys.run(r), "cell")))["seed"] for r in run_ids]
    return dict(zip(seeds, read_results(conn, run_ids), strict=True))


def _stage_spans(conn: redis.Redis) -> list[tuple[float, float]]:
    spans = []
    for key in conn.scan_iter(match=keys.stage("*")):
        name = text(key)
        if name.count(":") != 2:  # the stage hashes only, not their leases, logs or runs
            continue
        started, ended = conn.hmget(name, "started_at", "ended_at")
        if started and ended:
            spans.append((float(started), float(ended)))
    return spans


def _run_grid(conn: redis.Redis, workers: Workers, grid: Path, name: str, *, slots: int, home: Path) -> dict[int, Any]:
    # One thread per horse either way: the comparison is of slots alone. Each training step takes at least
    # 0.5 s, so a fine-tuning stage lasts seconds and two slots' stages overlap on a fast machine too.
    env = child_env(STL_HOME=str(home), STL_FAULT_INJECT="min_step_s=0.5")
    enqueue(grid, env=env)
    worker = workers.start(burst=True, env=env, extra_args=["--slots", str(slots)])
    assert worker.wait(timeout=500) == 0, workers.logs()
    assert grid_done(conn, name), workers.logs()
    return _results_by_seed(conn, name)


@pytest.mark.slow
def test_two_cpu_slots_run_stages_at_once_with_one_at_a_times_results(
        conn: redis.Redis, stl_env: Path, demo_data: Path, workers: Workers, tmp_path: Path) -> None:
    grid = small_grid(tmp_path, demo_data, "slots", seeds=[0, 1])  # two independent runs: finetune, then eval
    one_at_a_time = _run_grid(conn, workers, grid, "slots", slots=1, home=tmp_path / "home-1")
    spans_one = _stage_spans(conn)
    conn.flushdb()  # our own private server: the same stages again, from nothing, in another STL_HOME
    two_slots = _run_grid(conn, workers, grid, "slots", slots=2, home=tmp_path / "home-2")
    spans_two = _stage_spans(conn)
    assert sorted(one_at_a_time) == [0, 1] and all(one_at_a_time.values())
    assert two_slots == one_at_a_time  # every metric of every run, exactly
    overlapping = [(x, y) for i, x in enumerate(spans_two) for y in spans_two[i + 1:]
                   if max(x[0], y[0]) < min(x[1], y[1])]
    assert overlapping, f"no two stages ran at once with two slots: {spans_two}"
    assert not [(x, y) for i, x in enumerate(spans_one) for y in spans_one[i + 1:]
                if max(x[0], y[0]) < min(x[1], y[1])]  # and one slot runs one at a time
    assert "died unexpectedly" not in workers.logs()


@pytest.mark.slow
def test_a_burst_slot_waits_for_the_stage_beside_it_whose_end_queues_the_next(
        conn: redis.Redis, stl_env: Path, demo_data: Path, workers: Workers, tmp_path: Path) -> None:
    """One run: MTL, then the eval that depends on it. The slot that finds the queue empty at the start must
    not quit while the MTL stage runs: its end queues the eval, which either slot may then take."""
    grid = small_grid(tmp_path, demo_data, "chain", shots=[0], mtl=["in-domain"], train={"max_steps": 8})
    env = child_env(STL_FAULT_INJECT="min_step_s=0.5")
    enqueue(grid, env=env)
    worker = workers.start(burst=True, env=env, extra_args=["--slots", "2"])
    assert worker.wait(timeout=300) == 0, workers.logs()
    assert grid_done(conn, "chain"), workers.logs()
    lines = workers.logs().splitlines()
    mtl_done = next(i for i, line in enumerate(lines) if "Successfully completed mtl" in line)
    quits = [i for i, line in enumerate(lines) if "done, quitting" in line]
    assert len(quits) == 2 and min(quits) > mtl_done, workers.logs()


@pytest.mark.slow
def test_sigterm_to_a_slotted_worker_puts_every_running_stage_back(
        conn: redis.Redis, stl_env: Path, demo_data: Path, workers: Workers, tmp_path: Path) -> None:
    grid = small_grid(tmp_path, demo_data, "long", seeds=[0, 1], shots=[0], mtl=["in-domain"],
                      train={"max_steps": 400, "checkpoint_every": 2})
    enqueue(grid)
    worker = workers.start(extra_args=["--slots", "2"])
    device = f"{socket.gethostname()}:cpu"
    running = wait_for(lambda: len(stages_on_device(conn, device)) == 2 and stages_on_device(conn, device),
                       timeout=180, what="two stages on the CPU at once", diagnostics=workers.logs)
    slotted = sorted((w["slot"], w["slots"], w["device"], w["stage"]) for w in status_json()["workers"])
    assert [s[:3] for s in slotted] == [(1, 2, device), (2, 2, device)]
    assert sorted(s[3] for s in slotted) == running
    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=120) == 0, workers.logs()
    for stage_id in running:  # each checkpointed and went back to the head of its queue
        assert text(conn.hget(keys.stage(stage_id), "status")) == "queued", workers.logs()
        assert any("preempted" in line for line in stage_log(conn, stage_id))
    assert conn.scard(keys.device_stages(device)) == 0
