"""Load: 10,000 queued runs, five `stl status --json` pollers and bursts of enqueues, while a worker runs.

Nothing here asserts on time (bench/ measures speed); it asserts that nothing errs under load.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING

import pytest

from stl.jobs import keys
from tests.helpers import Workers, enqueue, small_grid, stl, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    import redis

QUEUED_RUNS = 10_000
POLLERS = 5
POLLS_EACH = 3
BURSTS = 3
ENQUEUES_PER_BURST = 4



@pytest.mark.slow
def test_ten_thousand_queued_runs_pollers_and_enqueue_bursts_while_a_worker_runs(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, workers: Workers) -> None:
    enqueue(small_grid(tmp_path, demo_data, "load-grid", shots=[0], seeds=list(range(QUEUED_RUNS))))
    assert conn.zcard(keys.RUNS) == QUEUED_RUNS
    worker = workers.start()
    wait_for(lambda: conn.scard(keys.WORKERS) > 0, timeout=60, what="the worker to start", diagnostics=workers.logs)

    problems: list[str] = []
    polls: list[int] = []
    enqueued: list[str] = []
    lock = threading.Lock()

    def poll() -> None:
        for _ in range(POLLS_EACH):
            result = stl("status", "--json", timeout=300)
            try:
                runs = len(json.loads(result.stdout)["runs"])
            except (ValueError, KeyError) as e:
                runs = -1
                with lock:
                    problems.append(f"status --json printed no valid JSON ({e}): {result.stderr[-500:]}")
            with lock:
                polls.append(runs)
                if result.returncode != 0 or "Traceback" in result.stderr:
                    problems.append(f"status --json exited {result.returncode}: {result.stderr[-500:]}")

    def burst(number: int) -> None:
        path = small_grid(tmp_path, demo_data, f"burst-{number}", shots=[0], seeds=[100_000 + number])
        result = stl("enqueue", str(path), timeout=300)
        with lock:
            if result.returncode != 0 or "queued 1 run(s)" not in result.stdout:
                problems.append(f"enqueue of burst-{number} exited {result.returncode}: {result.stderr[-500:]}")
            else:
                enqueued.append(f"burst-{number}")

    pollers = [threading.Thread(target=poll) for _ in range(POLLERS)]
    for thread in pollers:
        thread.start()
    for round_ in range(BURSTS):
        senders = [threading.Thread(target=burst, args=(round_ * ENQUEUES_PER_BURST + i,))
                   for i in range(ENQUEUES_PER_BURST)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
        time.sleep(1)
    for thread in pollers:
        thread.join()

    assert not problems, problems
    assert len(polls) == POLLERS * POLLS_EACH
    assert all(runs >= QUEUED_RUNS for runs in polls), polls
    assert len(enqueued) == BURSTS * ENQUEUES_PER_BURST
    assert conn.zcard(keys.RUNS) == QUEUED_RUNS + BURSTS * ENQUEUES_PER_BURST
    assert worker.alive(), workers.logs()
    statuses = json.loads(stl("status", "--json", "--grid", "load-grid").stdout)["runs"]
    finished = sum(r["status"] == "finished" for r in statuses)
    assert finished > 0, "the worker made progress under load"
    assert "Traceback" not in worker.output()

    # For information only: how long one `stl status --once` frame takes with this many runs.
    latencies = []
    for _ in range(3):
        started = time.perf_counter()
        result = stl("status", "--once")
        latencies.append(time.perf_counter() - started)
        assert result.returncode == 0, result.stderr
    print(f"\n`stl status --once` with {conn.zcard(keys.RUNS)} runs, a worker busy: "
          + ", ".join(f"{s:.2f} s" for s in latencies) + f"; {finished} runs finished meanwhile")
    worker.kill()
