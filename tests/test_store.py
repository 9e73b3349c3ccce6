"""One artifact store per queue: the workers of one Redis share the STL_HOME their stages read parents from,
and a parent model missing from it is made again rather than failing the runs that need it.

Real `stl worker` processes against a private redis-server; the faults are real: a second STL_HOME, a
wiped STL_HOME, a model folder deleted on disk.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from typing import TYPE_CHECKING

import pytest

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.grid.parse import parse_grid
from stl.jobs.specs import StageKind
from tests.helpers import (
    Workers,
    child_env,
    enqueue,
    grid_done,
    run_statuses,
    small_grid,
    stage_log,
    status_json,
    stl,
    wait_for,
)

if TYPE_CHECKING:
    from pathlib import Path

    import redis

    from tests.conftest import RedisServer

pytestmark = pytest.mark.slow



def worker_names(conn: redis.Redis) -> set[str]:
    return {text(name) for name in conn.smembers(keys.WORKERS) if conn.exists(keys.worker(text(name)))}


def only_stage(path: Path, kind: StageKind) -> str:
    [stage_id] = [sid for sid, spec in parse_grid(path).stages.items() if spec.kind == kind]
    return stage_id


def test_a_worker_with_another_stl_home_refuses_to_start_and_one_with_the_same_home_runs(
        stl_env: Path, conn: redis.Redis, redis_server: RedisServer, tmp_path: Path, demo_data: Path,
        workers: Workers) -> None:
    alice_home, bob_home = tmp_path / "home-alice", tmp_path / "home-bob"
    alice = child_env(STL_HOME=str(alice_home))
    first = workers.start(env=alice)
    wait_for(lambda: len(worker_names(conn)) == 1, timeout=60, what="the first worker to start",
             diagnostics=workers.logs)
    second = workers.start(env=alice)  # the same STL_HOME: welcome
    wait_for(lambda: len(worker_names(conn)) == 2, timeout=60, what="the second worker to start",
             diagnostics=workers.logs)
    enqueue(small_grid(tmp_path, demo_data, "shared", seeds=[0, 1, 2, 3]), env=alice)

    # Another STL_HOME on the same Redis, with stages waiting: it refuses before it takes any.
    refused = workers.start(burst=True, env=child_env(STL_HOME=str(bob_home)))
    code = refused.wait(timeout=60)
    output = refused.output()
    assert code == 2, output
    [line] = [line for line in output.splitlines() if line.startswith("stl: ")]
    assert f"STL_HOME {bob_home} " in line and str(alice_home) in line, line
    assert "share" in line and f"STL_REDIS_URL=redis://127.0.0.1:{redis_server.port}/1" in line, line
    assert "Traceback" not in output and "Job OK" not in output, output
    assert not (bob_home / "stages").exists()

    wait_for(lambda: grid_done(conn, "shared"), timeout=240, what="the grid to end", diagnostics=workers.logs)
    assert set(run_statuses(conn, "shared").values()) == {"finished"}, workers.logs()
    for worker in (first, second):  # both workers of the shared STL_HOME took stages
        assert worker.alive() and "Job OK" in worker.output(), workers.logs()
    store = status_json(env=alice)["store"]
    assert store["home"] == str(alice_home)
    assert json.loads((alice_home / "store.json").read_text())["id"] == store["id"]


def test_a_wiped_stl_home_is_adopted_only_when_asked_and_then_remakes_what_runs_need(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    home = stl_env
    first = small_grid(tmp_path, demo_data, "before-wipe", mtl=["in-domain"], shots=[0])
    enqueue(first)
    done = stl("worker", "--burst", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    old_id = json.loads((home / "store.json").read_text())["id"]

    shutil.rmtree(home)  # the disk was replaced, or someone emptied the folder
    later = small_grid(tmp_path, demo_data, "after-wipe", mtl=["in-domain"], shots=[4])  # needs the MTL model
    enqueue(later)
    refused = stl("worker", "--burst", timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert f"STL_HOME {home} " in refused.stderr and "no store id" in refused.stderr, refused.stderr
    assert "`stl worker --adopt-store` makes this folder the queue's store" in refused.stderr
    assert not (home / "store.json").exists()  # a refused worker writes no store id
    assert set(run_statuses(conn, "after-wipe").values()) == {"queued"}

    adopted = stl("worker", "--burst", "--adopt-store", timeout=300)
    assert adopted.returncode == 0, adopted.stderr[-3000:]
    new_id = json.loads((home / "store.json").read_text())["id"]
    assert new_id != old_id and status_json()["store"]["id"] == new_id
    assert set(run_statuses(conn, "after-wipe").values()) == {"finished"}, adopted.stderr[-3000:]
    mtl = only_stage(later, StageKind.mtl)
    assert sum(" started on " in line for line in stage_log(conn, mtl)) == 2  # made again in the new home
    assert (home / "stages" / mtl / "model").is_dir()
    assert set(run_statuses(conn, "before-wipe").values()) == {"finished"}


def test_a_deleted_parent_model_is_made_again_and_every_run_that_needs_it_finishes(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    first = small_grid(tmp_path, demo_data, "mtl-then-eval", mtl=["in-domain"], shots=[0])
    enqueue(first)
    assert stl("worker", "--burst", timeout=300).returncode == 0
    mtl = only_stage(first, StageKind.mtl)
    shutil.rmtree(stl_env / "stages" / mtl / "model")  # a clean-up by hand, or a disk quota script

    # Two few-shot stages start from that MTL model: both queued at once, both find it missing.
    later = small_grid(tmp_path, demo_data, "needs-the-mtl", mtl=["in-domain"], shots=[4, 8])
    enqueue(later)
    result = stl("worker", "--burst", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = run_statuses(conn, "needs-the-mtl")
    assert len(statuses) == 2 and set(statuses.values()) == {"finished"}, result.stderr[-3000:]
    assert set(run_statuses(conn, "mtl-then-eval").values()) == {"finished"}
    mtl_log = stage_log(conn, mtl)
    assert sum(" started on " in line for line in mtl_log) == 2, mtl_log  # made again once, not per child
    assert any("to be made again: its model is missing" in line for line in mtl_log), mtl_log
    assert (stl_env / "stages" / mtl / "model").is_dir()
    for run_id in statuses:  # every stage counted once, though the MTL stage finished twice
        total, done, n_stages, stages_done = conn.hmget(keys.run(run_id), "work_total", "work_done", "n_stages",
                                                        "stages_done")
        assert int(total) == int(done) and int(n_stages) == int(stages_done)
    logs = [stl("logs", run_id).stdout for run_id in statuses]
    assert any(f"the model of its parent stage {mtl}" in log and "made again first" in log for log in logs), logs
    assert len(json.loads(stl("results", "needs-the-mtl", "--json").stdout)["rows"]) == 2


def test_a_parent_model_that_keeps_vanishing_fails_the_run_clearly_and_retry_finishes_it(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    first = small_grid(tmp_path, demo_data, "vanishing", mtl=["in-domain"], shots=[0])
    enqueue(first)
    assert stl("worker", "--burst", timeout=300).returncode == 0
    mtl = only_stage(first, StageKind.mtl)
    model = stl_env / "stages" / mtl / "model"
    stop = threading.Event()

    def clean_up() -> None:  # a clean-up job that deletes the model whenever it reappears
        while not stop.is_set():
            shutil.rmtree(model, ignore_errors=True)
            time.sleep(0.01)

    cleaner = threading.Thread(target=clean_up, daemon=True)
    cleaner.start()
    try:
        later = small_grid(tmp_path, demo_data, "vanishing-again", mtl=["in-domain"], shots=[4])
        enqueue(later)
        result = stl("worker", "--burst", timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        stop.set()
        cleaner.join()
    [(run_id, status)] = run_statuses(conn, "vanishing-again").items()
    assert status == "failed"
    error = text(conn.hget(keys.run(run_id), "error"))
    assert ": ModelError: " in error and mtl in error and "made again 3 times" in error, error
    assert "`stl retry`" in error, error

    retried = stl("retry", run_id)
    assert retried.returncode == 0, retried.stderr
    result = stl("worker", "--burst", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_statuses(conn, "vanishing-again") == {run_id: "finished"}, result.stderr[-3000:]


def test_the_way_out_names_another_database_and_never_the_password() -> None:
    from stl.jobs.queue.store import another_database

    assert another_database("redis://localhost:6379/0") == "redis://localhost:6379/1"
    assert another_database("redis://:s3cret@redis.lab:6380/4") == "redis://:PASSWORD@redis.lab:6380/5"
    assert another_database("redis://box") == "redis://box:6379/1"
