"""A parent model missing from STL_HOME is made again rather than failing the runs that need it.

Real `stl worker` processes against a private redis-server; the fault is real: a model folder deleted on disk.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from typing import TYPE_CHECKING

import pytest

from jobs import keys
from jobs.codec import text
from jobs.grid import parse_grid
from jobs.specs import StageKind
from tests.test_faults import (
    Workers,
    enqueue,
    run_statuses,
    small_grid,
    stage_log,
    stl,
    worker_pool,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import redis


pytestmark = pytest.mark.slow


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    yield from worker_pool(tmp_path)


def worker_names(conn: redis.Redis) -> set[str]:
    return {text(name) for name in conn.smembers(keys.WORKERS) if conn.exists(keys.worker(text(name)))}


def only_stage(path: Path, kind: StageKind) -> str:
    [stage_id] = [sid for sid, spec in parse_grid(path).stages.items() if spec.kind == kind]
    return stage_id


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
    assert f"the model of its parent stage {mtl} was made again 3 times and went missing each time" in error, error
    assert "`stl retry`" in error, error

    retried = stl("retry", run_id)
    assert retried.returncode == 0, retried.stderr
    result = stl("worker", "--burst", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_statuses(conn, "vanishing-again") == {run_id: "finished"}, result.stderr[-3000:]

