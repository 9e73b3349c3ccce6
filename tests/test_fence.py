"""Fencing a work horse's writes with its stage's generation, finishing a stage once, and runs that are
"finished" only with every result. The frozen horse itself, with real processes: test_fault_frozen_horse.py."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.errors import StageLeaseLost
from stl.jobs.grid.parse import parse_grid
from stl.jobs.queue.queueing import submit_runs
from stl.jobs.settings import load_settings
from stl.jobs.states import RunStatus, StageKind
from tests.helpers import grid_dict, wait_for, write_grid

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import redis

    from stl.jobs.grid.parse import ExpandedGrid
    from stl.jobs.queue.fence import StageFence

STAGE = "0" * 20


def test_a_horse_whose_stage_another_took_can_neither_renew_nor_write_nor_release(
        conn: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    from stl.jobs.queue import stage_lease

    monkeypatch.setattr(stage_lease, "HEARTBEAT_EVERY_S", 0.05)
    frozen = stage_lease.StageLease(conn, STAGE, "here:1")
    assert frozen.acquire() and frozen.fence.token == 1
    conn.delete(frozen.key)  # it expired while the horse was frozen
    newer = stage_lease.StageLease(conn, STAGE, "there:2")
    assert newer.acquire() and newer.fence.token == 2
    newer.release()  # the newer horse finished: no lease left for the frozen one to take back
    conn.srem(keys.RUNNING_STAGES, STAGE)

    frozen.start_heartbeat()  # the frozen horse wakes up
    try:
        wait_for(lambda: frozen.lost, timeout=5, what="the heartbeat to notice the newer take")
        assert not conn.exists(frozen.key) and not conn.sismember(keys.RUNNING_STAGES, STAGE)
        assert frozen.taken_over()
        with pytest.raises(StageLeaseLost, match="taken over by another work horse"):
            frozen.fence.write(lambda pipe: pipe.set("written", 1))
        with pytest.raises(StageLeaseLost):
            frozen.fence.check()
        assert not conn.exists("written")
    finally:
        frozen.release()
    assert newer.fence.write(lambda pipe: pipe.set("written", 1)) == [True]
    # A release by the frozen horse leaves a newer holder's lease alone, even under its own name.
    conn.set(frozen.key, "here:1", ex=30)
    assert stage_lease.StageLease(conn, STAGE, "here:1").acquire() is False
    frozen.release()
    assert text(conn.get(frozen.key)) == "here:1"


def test_a_take_that_redis_lost_in_a_restart_is_not_a_takeover(
        conn: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    from stl.jobs.queue import stage_lease

    monkeypatch.setattr(stage_lease, "HEARTBEAT_EVERY_S", 0.05)
    lease = stage_lease.StageLease(conn, STAGE, "here:1")
    assert lease.acquire()
    conn.delete(lease.key, lease.fence.key)  # the last second before the restart: the take itself is gone
    assert lease.fence.is_current()
    lease.start_heartbeat()
    try:
        wait_for(lambda: text(conn.get(lease.fence.key)) == "1", timeout=5, what="the take to be written back")
        assert text(conn.get(lease.key)) == "here:1" and not lease.lost
    finally:
        lease.release()


def _mtl_and_eval(conn: redis.Redis, tmp_path: Path, demo_data: Path) -> ExpandedGrid:
    grid = grid_dict(demo_data)
    grid["grid"].update(model=["tiny:bart"], mtl=["in-domain"], shots=[0], seed=[0])
    expanded = parse_grid(write_grid(tmp_path, demo_data, grid=grid["grid"]))
    submit_runs(conn, expanded.runs, expanded.stages, user="alice", priority="normal", stage_timeout=60)
    return expanded


def _run(conn: redis.Redis, run_id: str) -> dict[str, str]:
    return {text(k): text(v) for k, v in conn.hgetall(keys.run(run_id)).items()}


def test_finishing_a_stage_twice_counts_it_once_and_a_stale_horse_cannot_finish_it(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    from stl.jobs.queue.entry import finish_stage
    from stl.jobs.queue.stage_lease import StageLease

    expanded = _mtl_and_eval(conn, tmp_path, demo_data)
    [run] = expanded.runs
    mtl, evaluation = run.stages
    spec = expanded.stages[mtl]
    assert spec.kind == StageKind.mtl
    frozen = StageLease(conn, mtl, "here:1")
    assert frozen.acquire()
    conn.delete(frozen.key)
    newer = StageLease(conn, mtl, "there:2")
    assert newer.acquire()

    def finish(fence: StageFence | None = None) -> bool:
        return finish_stage(conn, load_settings(), mtl, spec, status=RunStatus.finished, error="", started=0.0,
                            user="alice", result={"metrics": [], "train": None}, fence=fence)

    with pytest.raises(StageLeaseLost):
        finish(frozen.fence)
    assert text(conn.hget(keys.stage(mtl), "status")) == "queued" and _run(conn, run.run_id)["stages_done"] == "0"
    assert finish(newer.fence)
    first = {**_run(conn, run.run_id), "stage": conn.hgetall(keys.stage(mtl))}
    assert first["status"] == "queued" and first["stages_done"] == "1"
    assert not finish(newer.fence) and not finish()  # again, by its horse or by a reaper: nothing changes
    assert {**_run(conn, run.run_id), "stage": conn.hgetall(keys.stage(mtl))} == first
    with pytest.raises(StageLeaseLost):
        finish(frozen.fence)
    assert _run(conn, run.run_id)["status"] == "queued", "the run still waits for its evaluation"

    tasks = list(expanded.stages[evaluation].tasks)
    finish_stage(conn, load_settings(), evaluation, expanded.stages[evaluation], status=RunStatus.finished, error="",
                 started=0.0, user="alice", result={"metrics": [{"task": t, "value": 0.5} for t in tasks]})
    assert _run(conn, run.run_id)["status"] == "finished"
    assert sorted(text(t) for t in conn.hkeys(keys.run_results(run.run_id))) == sorted(tasks)


def test_a_run_whose_stages_ended_without_all_its_results_fails_naming_them(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    from stl.jobs.queue.entry import finish_stage

    expanded = _mtl_and_eval(conn, tmp_path, demo_data)
    [run] = expanded.runs
    mtl, evaluation = run.stages
    tasks = list(expanded.stages[evaluation].tasks)
    assert len(tasks) == 2
    # The state a double-counted stage leaves: its run believes the MTL stage is done twice over.
    conn.hset(keys.run(run.run_id), "stages_done", 1)
    assert finish_stage(conn, load_settings(), mtl, expanded.stages[mtl], status=RunStatus.finished, error="",
                        started=0.0, user="alice", result={"metrics": [], "train": None})
    record = _run(conn, run.run_id)
    assert record["status"] == "failed"
    assert record["error"] == f"its stages ended, but the results of {', '.join(tasks)} are missing; `stl retry` " \
        "runs it again"
    assert json.loads(text(conn.hget(keys.stage(mtl), "outcome"))) == {"metrics": [], "train": None}


def test_a_refused_commit_leaves_what_is_on_disk_and_no_temporary_behind(tmp_path: Path) -> None:
    from stl.jobs.ml.models import replace_directory

    target, source = tmp_path / "model", tmp_path / ".model.tmp"
    target.mkdir()
    (target / "weights").write_text("the newer horse's")
    source.mkdir()
    (source / "weights").write_text("the stale horse's")

    def refuse() -> None:
        raise StageLeaseLost("taken over")

    with pytest.raises(StageLeaseLost):
        replace_directory(source, target, before_replace=refuse)
    assert (target / "weights").read_text() == "the newer horse's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def refuse_after(passes: int) -> Callable[[], None]:
    """A fence that lets `passes` commits through, then finds the stage taken over."""
    calls = {"n": 0}

    def fence() -> None:
        calls["n"] += 1
        if calls["n"] > passes:
            raise StageLeaseLost("taken over")

    return fence


def test_a_stage_taken_over_mid_training_or_evaluation_commits_nothing_more(tmp_path: Path, demo_data: Path) -> None:
    from stl.jobs.ml.stages import StageContext, execute_stage
    from stl.jobs.specs import EvalConfig, StageSpec
    from tests.test_fault_kill import checkpoint_step
    from tests.test_train import train_spec

    def context(name: str, fence: Callable[[], None]) -> StageContext:
        return StageContext(workdir=tmp_path / "stages" / name, parent_dir=None, device="cpu",
                            on_step=lambda report: None, should_stop=lambda: None, log=lambda line: None,
                            cache_dir=tmp_path / "cache", fence=fence)

    # Checkpoints at steps 4 and 8: the first commits, then another horse has the stage. A save checks twice:
    # before it clears older checkpoints (which may be the newer horse's) and before its commit.
    with pytest.raises(StageLeaseLost):
        execute_stage(train_spec(demo_data, max_steps=9, checkpoint_every=4), context("mtl", refuse_after(2)))
    assert checkpoint_step(tmp_path, "mtl") == 4
    assert sorted(p.name for p in (tmp_path / "stages" / "mtl").iterdir()) == ["checkpoint"]

    evaluation = StageSpec(kind=StageKind.eval, model="tiny:bart", data=str(demo_data), tasks=("summarization",),
                           eval=EvalConfig(max_examples=2, batch_size=2, max_new_tokens=4))
    with pytest.raises(StageLeaseLost):
        execute_stage(evaluation, context("eval", refuse_after(0)))
    assert list((tmp_path / "stages" / "eval").iterdir()) == []


def test_a_horse_that_cannot_reach_redis_commits_nothing() -> None:
    import redis as redis_lib

    from stl.jobs.queue.fence import StageFence
    from tests.conftest import free_port

    unreachable = redis_lib.Redis(port=free_port(), socket_connect_timeout=0.2)
    with pytest.raises(StageLeaseLost, match="Redis is unreachable"):
        StageFence(unreachable, STAGE, 1).check()
