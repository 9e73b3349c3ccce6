"""The queue on a real redis-server: atomic enqueue, dedupe, fair share, cancel, retry, safety."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zlib
from typing import TYPE_CHECKING

import pytest
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from typer.testing import CliRunner

from stl.cli.main import app
from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.errors import NotFound
from stl.jobs.grid.parse import parse_grid
from stl.jobs.queue.fairshare import charge_usage, queue_order
from stl.jobs.queue.queueing import job_id_for, submit_runs
from stl.jobs.settings import load_settings
from tests.helpers import grid_dict, run_statuses, write_grid

if TYPE_CHECKING:
    from pathlib import Path

    import redis

runner = CliRunner()


def enqueue(path: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["enqueue", str(path), *args])
    return result.exit_code, result.stdout, result.stderr


def queued_job_ids(conn: redis.Redis, user: str, priority: str = "normal") -> list[str]:
    return [j.decode() for j in conn.lrange(f"rq:queue:{keys.queue_name(user, priority)}", 0, -1)]


def test_enqueue_writes_runs_stages_and_rq_jobs(stl_env: Path, conn: redis.Redis, tmp_path: Path,
                                                demo_data: Path) -> None:
    path = write_grid(tmp_path, demo_data)
    code, out, err = enqueue(path)
    assert code == 0, err
    assert "queued 4 run(s)" in out and "skipped 0" in out and "stl status --grid test-grid" in out
    expanded = parse_grid(path)
    assert conn.zcard(keys.RUNS) == 4
    # stages with no unfinished parent are queued; the rest wait on their parent through RQ
    ready = queued_job_ids(conn, "alice")
    for sid, spec in expanded.stages.items():
        job = Job.fetch(job_id_for(sid), connection=conn, serializer=JSONSerializer)
        assert job.func_name == "stl.jobs.queue.entry.run_stage"
        assert job.timeout == 86400 and job.result_ttl is not None and job.result_ttl > 500
        if spec.parent is None:
            assert job.id in ready
        else:
            assert job.get_status().value == "deferred"
            assert job._dependency_ids == [job_id_for(spec.parent)]


def test_one_bad_cell_writes_nothing(stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    grid = grid_dict(demo_data)
    grid["grid"]["model"] = ["tiny:bart", "tiny:nope"]
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    code, out, err = enqueue(path)
    assert code == 2
    assert "tiny:nope" in err and err.startswith(f"{path}:")
    assert "Traceback" not in err + out
    assert conn.dbsize() == 0


def test_identical_runs_are_skipped(stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    path = write_grid(tmp_path, demo_data)
    assert enqueue(path)[0] == 0
    before = queued_job_ids(conn, "alice")
    code, out, _ = enqueue(path)
    assert code == 0 and "queued 0 run(s)" in out and "skipped 4" in out
    assert queued_job_ids(conn, "alice") == before
    # a grid that adds a seed queues only the new runs, and reuses nothing it should not
    grid = grid_dict(demo_data)
    grid["grid"]["seed"] = [0, 1]
    import yaml

    path.write_text(yaml.safe_dump(grid))
    code, out, _ = enqueue(path)
    assert "queued 4 run(s)" in out and "skipped 4" in out


def test_an_edited_grid_is_refused_under_its_old_name_unless_replace(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    path = write_grid(tmp_path, demo_data)
    assert enqueue(path)[0] == 0
    old_runs = set(conn.zrange(keys.grid_runs("test-grid"), 0, -1))
    written = conn.dbsize()
    # Scoring more examples changes every run's stages, so every cell has a run with other settings.
    edited = write_grid(tmp_path, demo_data, filename="edited.yaml",
                        eval={**grid_dict(demo_data)["eval"], "max_examples": 8})
    code, out, err = enqueue(edited)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (out, err)
    assert '"test-grid"' in err and "4 run(s)" in err, err
    assert "give the grid a new name, or pass --replace" in err
    assert conn.dbsize() == written and set(conn.zrange(keys.grid_runs("test-grid"), 0, -1)) == old_runs
    # a dry run says the same, and what --replace would drop, writing nothing either way
    code, out, err = enqueue(edited, "--dry-run")
    assert code == 2 and out == "" and 'grid "test-grid" already has 4 run(s)' in err, (out, err)
    code, out, err = enqueue(edited, "--dry-run", "--replace")
    assert code == 0 and "--replace would cancel and drop 4 run(s) of grid test-grid" in out, (out, err)
    assert conn.dbsize() == written

    code, out, err = enqueue(edited, "--replace")
    assert code == 0, err
    assert "dropped 4 run(s) of grid test-grid" in out and "queued 4 run(s)" in out, out
    new_runs = set(conn.zrange(keys.grid_runs("test-grid"), 0, -1))
    assert len(new_runs) == 4 and not new_runs & old_runs
    assert not any(conn.exists(keys.run(r.decode())) for r in old_runs)
    assert all(conn.zscore(keys.RUNS, r) is None for r in old_runs)
    assert {text(conn.hget(keys.run(r.decode()), "status")) for r in new_runs} == {"queued"}
    # the dropped runs were queued: they were canceled first, so stages only they needed will not run
    only_old = set(parse_grid(path).stages) - set(parse_grid(edited).stages)
    assert only_old and {text(conn.hget(keys.stage(sid), "status")) for sid in only_old} == {"canceled"}


def test_runs_of_cells_the_edited_file_no_longer_lists_count_as_changed(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    import yaml

    def grid_file(seeds: list[int], max_examples: int) -> Path:  # every run scores the eval examples
        grid = grid_dict(demo_data)
        grid["grid"]["seed"] = seeds
        grid["eval"]["max_examples"] = max_examples
        path = tmp_path / f"grid-{'-'.join(map(str, seeds))}-{max_examples}.yaml"
        path.write_text(yaml.safe_dump(grid, sort_keys=False))
        return path

    assert enqueue(grid_file([0, 1], 6))[0] == 0
    old_runs = set(conn.zrange(keys.grid_runs("test-grid"), 0, -1))
    assert len(old_runs) == 8
    # Dropping a seed with the same settings changes nothing: the seed-1 runs stay, and are still valid.
    code, out, err = enqueue(grid_file([0], 6))
    assert code == 0 and "queued 0 run(s)" in out, (out, err)
    # A new seed with other settings would sit next to runs made with the old ones.
    written = conn.dbsize()
    code, out, err = enqueue(grid_file([2], 5))
    assert code == 2 and 'already has 8 run(s) made with other settings' in err, (out, err)
    assert conn.dbsize() == written
    # --replace drops every run the edited file would make differently, seed 1's too, not only its own cells'.
    code, out, err = enqueue(grid_file([0], 5), "--replace")
    assert code == 0, err
    assert "dropped 8 run(s)" in out and "queued 4 run(s)" in out
    now = set(conn.zrange(keys.grid_runs("test-grid"), 0, -1))
    assert len(now) == 4 and not now & old_runs
    assert {json.loads(text(conn.hget(keys.run(r.decode()), "cell")))["seed"] for r in now} == {0}


def test_a_cell_the_edited_file_cannot_express_is_left_alone(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    mixtures = {"general": {"data": str(demo_data), "tasks": ["act_classification"]}}
    grid = grid_dict(demo_data, mixtures=mixtures)
    grid["grid"]["mtl"] = ["none", "general"]
    path = tmp_path / "b.yaml"
    import yaml

    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    assert enqueue(path)[0] == 0
    # The same settings without the mixture: the general-MTL runs cannot be compared, so they stay.
    expanded = parse_grid(write_grid(tmp_path, demo_data, filename="c.yaml"))
    cells = [json.loads(text(conn.hget(keys.run(r.decode()), "cell")))
             for r in conn.zrange(keys.grid_runs("test-grid"), 0, -1)]
    ids = expanded.run_ids_for(cells)
    assert [i is None for i in ids].count(True) == 2 and all(
        (i is None) == (c["mtl"] == "general") for i, c in zip(ids, cells, strict=True))
    code, out, err = enqueue(tmp_path / "c.yaml")
    assert code == 0 and "queued 2 run(s)" in out, (out, err)  # the in-domain cells are new
    assert conn.zcard(keys.grid_runs("test-grid")) == 6


def test_dry_run_writes_nothing(stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    path = write_grid(tmp_path, demo_data)
    code, out, _ = enqueue(path, "--dry-run")
    assert code == 0 and "4 runs" in out
    assert all(fact in " ".join(out.split()) for fact in ("would queue 4 ", "skip 0")), out
    assert conn.dbsize() == 0
    # with runs queued, it says which an enqueue would skip
    assert enqueue(path)[0] == 0
    grid = grid_dict(demo_data)
    grid["grid"]["seed"] = [0, 1]
    import yaml

    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    written = conn.dbsize()
    code, out, _ = enqueue(path, "--dry-run")
    assert code == 0 and "enqueue would queue 4 and skip 4 already queued or finished" in " ".join(out.split())
    assert out.count("skip (queued)") == 4 and conn.dbsize() == written


def test_dry_run_without_redis_still_lists_the_runs(tmp_path: Path, demo_data: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STL_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("STL_HOME", str(tmp_path / "home"))
    code, out, err = enqueue(write_grid(tmp_path, demo_data), "--dry-run")
    assert code == 0 and "4 runs" in out, err
    assert "Redis not reachable" in " ".join(out.split())
    assert not (tmp_path / "home").exists()


def test_fair_share_prefers_the_user_with_least_recent_gpu_time(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    settings = load_settings()
    grid = grid_dict(demo_data)
    grid["grid"]["seed"] = list(range(10))
    grid["grid"]["mtl"] = ["none"]
    grid["grid"]["shots"] = [0]
    import yaml

    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump(grid))
    expanded = parse_grid(big)
    submit_runs(conn, expanded.runs, expanded.stages, user="alice", priority="normal", stage_timeout=60)
    grid["name"] = "small"
    grid["grid"]["seed"] = [99]
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(grid))
    expanded_small = parse_grid(small)
    submit_runs(conn, expanded_small.runs, expanded_small.stages, user="bob", priority="normal", stage_timeout=60)

    charge_usage(conn, "alice", 600.0)
    assert queue_order(conn)[:3] == [keys.queue_name("bob", p) for p in ("high", "normal", "low")]

    from stl.worker.main import StlWorker

    worker = StlWorker(connection=conn, settings=settings, gpu_index=None)
    job, queue = worker.dequeue_job_and_maintain_ttl(None)  # type: ignore[misc]
    assert queue.name == keys.queue_name("bob", "normal")
    assert job.id == job_id_for(expanded_small.runs[0].stages[0])
    # with bob now the heavier user, alice's queue comes first again
    charge_usage(conn, "bob", 1200.0)
    job, queue = worker.dequeue_job_and_maintain_ttl(None)  # type: ignore[misc]
    assert queue.name == keys.queue_name("alice", "normal")


def test_fair_share_counts_a_running_stage_until_its_last_heartbeat(conn: redis.Redis) -> None:
    from stl.jobs.queue.fairshare import users_by_usage

    now = 1_000_000.0
    conn.sadd(keys.USERS, "alice", "bob")
    charge_usage(conn, "bob", 300.0, now=now)
    assert [user for user, _ in users_by_usage(conn, now=now)] == ["alice", "bob"]
    # alice's stage has held a GPU for 10 minutes: bob, with 5 minutes charged, comes first now.
    conn.hset(keys.stage("s1"), mapping={"user": "alice", "status": "running", "started_at": now - 600,
                                         "heartbeat": now - 2})
    conn.sadd(keys.RUNNING_STAGES, "s1")
    assert users_by_usage(conn, now=now) == [("bob", pytest.approx(300.0)), ("alice", pytest.approx(598.0))]
    # A stage whose worker died stops counting at its last heartbeat; one that is not running counts nothing.
    conn.hset(keys.stage("s1"), "heartbeat", now - 590)
    assert users_by_usage(conn, now=now) == [("alice", pytest.approx(10.0)), ("bob", pytest.approx(300.0))]
    conn.hset(keys.stage("s1"), mapping={"status": "queued", "heartbeat": now})
    assert users_by_usage(conn, now=now)[0] == ("alice", 0.0)


def test_priority_orders_within_one_users_queue(stl_env: Path, conn: redis.Redis, tmp_path: Path,
                                                demo_data: Path) -> None:
    low = write_grid(tmp_path, demo_data, "low.yaml", name="low-grid")
    axes = grid_dict(demo_data)["grid"]
    axes["seed"] = [5]
    high = write_grid(tmp_path, demo_data, "high.yaml", name="high-grid", grid=axes)
    assert enqueue(low, "--priority", "low")[0] == 0
    assert enqueue(high, "--priority", "high")[0] == 0
    order = queue_order(conn)
    assert order.index(keys.queue_name("alice", "high")) < order.index(keys.queue_name("alice", "low"))
    assert enqueue(low, "--priority", "urgent")[0] == 2


def test_cancel_queued_runs_and_retry(stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    path = write_grid(tmp_path, demo_data)
    enqueue(path)
    expanded = parse_grid(path)
    zero_shot_plain = next(r for r in expanded.runs if r.cell["mtl"] == "none" and r.cell["shots"] == 0)
    result = runner.invoke(app, ["cancel", zero_shot_plain.run_id])
    assert result.exit_code == 0, result.stderr
    assert conn.hget(keys.run(zero_shot_plain.run_id), "status") == b"canceled"
    (eval_stage,) = zero_shot_plain.stages
    assert job_id_for(eval_stage) not in queued_job_ids(conn, "alice")
    assert conn.hget(keys.stage(eval_stage), "status") == b"canceled"

    # the MTL stage is shared by two runs: canceling one of them leaves it queued for the other
    mtl_runs = [r for r in expanded.runs if r.cell["mtl"] == "in-domain"]
    runner.invoke(app, ["cancel", mtl_runs[0].run_id])
    assert conn.hget(keys.stage(mtl_runs[0].stages[0]), "status") == b"queued"
    assert job_id_for(mtl_runs[0].stages[0]) in queued_job_ids(conn, "alice")

    result = runner.invoke(app, ["retry", "--grid", "test-grid"])
    assert result.exit_code == 0, result.stderr
    assert "re-queued 2 of 4 run(s)" in result.stdout
    assert conn.hget(keys.run(zero_shot_plain.run_id), "status") == b"queued"
    assert job_id_for(eval_stage) in queued_job_ids(conn, "alice")


def test_only_the_owner_may_cancel_without_force(stl_env: Path, conn: redis.Redis, tmp_path: Path,
                                                 demo_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_grid(tmp_path, demo_data)
    enqueue(path)
    run_id = parse_grid(path).runs[0].run_id
    monkeypatch.setenv("STL_USER", "mallory")
    result = runner.invoke(app, ["cancel", run_id])
    assert result.exit_code != 0
    assert "owned by alice" in result.stderr and "--force" in result.stderr
    assert conn.hget(keys.run(run_id), "status") == b"queued"
    result = runner.invoke(app, ["cancel", run_id, "--force"])
    assert result.exit_code == 0
    assert conn.hget(keys.run(run_id), "status") == b"canceled"
    result = runner.invoke(app, ["retry", run_id])
    assert result.exit_code != 0 and "owned by alice" in result.stderr


def test_a_grid_name_is_its_first_users_and_grid_commands_leave_other_users_runs_alone(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    enqueue(write_grid(tmp_path, demo_data))  # alice's test-grid, 4 runs
    more = grid_dict(demo_data)
    more["grid"]["seed"] = [0, 1]
    path = tmp_path / "more.yaml"
    path.write_text(yaml.safe_dump(more))
    monkeypatch.setenv("STL_USER", "bob")
    code, out, err = enqueue(path)
    assert code == 2 and 'grid "test-grid" belongs to alice; give yours another name' in err
    code, out, err = enqueue(path, "--force")
    assert code == 0 and "queued 4 run(s)" in out, err
    bobs = {r for r in map(text, conn.zrange(keys.grid_runs("test-grid"), 0, -1))
            if text(conn.hget(keys.run(r), "user")) == "bob"}
    assert len(bobs) == 4

    # alice's --grid commands act on her runs and say what they left; a finished run blocks nothing
    monkeypatch.setenv("STL_USER", "alice")
    alices = [r for r in map(text, conn.zrange(keys.grid_runs("test-grid"), 0, -1)) if r not in bobs]
    conn.hset(keys.run(alices[0]), "status", "finished")
    result = runner.invoke(app, ["cancel", "--grid", "test-grid"])
    assert result.exit_code == 0, result.stderr
    facts = ("canceled 3 of 8", "1 had already ended", "left 4 live")
    assert all(fact in result.stdout for fact in facts), result.stdout
    assert {text(conn.hget(keys.run(r), "status")) for r in bobs} == {"queued"}
    result = runner.invoke(app, ["retry", "--grid", "test-grid"])
    assert result.exit_code == 0 and "re-queued 3 of 8 run(s)" in result.stdout, result.stderr


def test_cli_rejects_bad_run_ids_before_they_become_paths(stl_env: Path, conn: redis.Redis) -> None:
    for bad in ["../../etc/passwd", "abc", "$(rm -rf ~)", "0123456789abcdef0"]:
        result = runner.invoke(app, ["logs", bad])
        assert result.exit_code == 2, bad
        assert "is not a run id" in result.stderr
    result = runner.invoke(app, ["logs", "0123456789abcdef"])
    assert result.exit_code == 2 and "no run with id" in result.stderr


def _run_worker_burst(stl_env: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stl.cli.main", "worker", "--burst"], capture_output=True,
                          text=True, timeout=120, check=False)


def test_worker_refuses_foreign_functions_and_pickles(stl_env: Path, conn: redis.Redis, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    conn.sadd(keys.USERS, "alice")
    queue = Queue(keys.queue_name("alice", "normal"), connection=conn, serializer=JSONSerializer)
    foreign = queue.enqueue("os.system", f"touch {marker}")
    # a job whose data is a pickle, as RQ's default serializer would write it
    forged = queue.enqueue("stl.jobs.queue.entry.run_stage", "x")
    payload = zlib.compress(pickle.dumps(("os.system", None, (f"touch {marker}",), {})))
    conn.hset(Job.key_for(forged.id), "data", payload)

    result = _run_worker_burst(stl_env)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    for job_id, needle in [(foreign.id, "names 'os.system'"), (forged.id, "not stl's JSON")]:
        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
        assert job.get_status().value == "failed"
        assert needle in (job.latest_result().exc_string if job.latest_result() else "")  # type: ignore[union-attr]


@pytest.mark.slow
def test_jobs_queued_under_the_entry_points_old_module_path_still_run(stl_env: Path, conn: redis.Redis,
                                                                      tmp_path: Path, demo_data: Path) -> None:
    """A queue written before stl installed as stl.*: its jobs name jobs.entry.run_stage, which no longer imports."""
    path = write_grid(tmp_path, demo_data, grid={"model": ["tiny:bart"], "mtl": ["none"], "instructions": [True],
                                                 "shots": [0], "seed": [0]})
    assert enqueue(path)[0] == 0
    (job_id,) = queued_job_ids(conn, "alice")
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    args = job.args
    job.func_name = "jobs.entry.run_stage"
    assert job.args == args
    conn.hset(job.key, "data", zlib.compress(job.data))

    result = _run_worker_burst(stl_env)
    assert result.returncode == 0, result.stderr
    assert Job.fetch(job_id, connection=conn, serializer=JSONSerializer).func_name == "stl.jobs.queue.entry.run_stage"
    assert Job.fetch(job_id, connection=conn, serializer=JSONSerializer).get_status().value == "finished", \
        result.stderr[-3000:]
    assert set(run_statuses(conn, "test-grid").values()) == {"finished"}


def test_a_stage_rq_left_in_its_ready_registry_runs_at_the_workers_next_poll(stl_env: Path, conn: redis.Redis,
                                                                           tmp_path: Path, demo_data: Path) -> None:
    """RQ marks a finished stage's dependents ready, then enqueues them under an optimistic lock on the queue's
    ready registry; when another worker commits to that registry at the same moment (two slots finishing
    together), RQ leaves the job there for its maintenance, ten minutes later (stl.jobs.queue.dependents)."""
    path = write_grid(tmp_path, demo_data, grid={"model": ["tiny:bart"], "mtl": ["none"], "instructions": [True],
                                                 "shots": [0], "seed": [0]})
    assert enqueue(path)[0] == 0
    (job_id,) = queued_job_ids(conn, "alice")
    queue = Queue(keys.queue_name("alice", "normal"), connection=conn, serializer=JSONSerializer)
    # The state RQ leaves after losing that race: off the queue, status ready_to_enqueue, in the ready registry.
    conn.lrem(queue.key, 0, job_id)
    conn.hset(f"rq:job:{job_id}", "status", "ready_to_enqueue")
    conn.zadd(queue.ready_job_registry.key, {job_id: 1.0})
    # Another worker ran RQ's maintenance a moment ago: this one's maintenance leaves the registries alone.
    for name in queue_order(conn):
        conn.set(Queue(name, connection=conn).registry_cleaning_key, 1, ex=60)

    result = _run_worker_burst(stl_env)
    assert result.returncode == 0, result.stderr
    assert Job.fetch(job_id, connection=conn, serializer=JSONSerializer).get_status().value == "finished", \
        result.stderr[-3000:]
    assert set(run_statuses(conn, "test-grid").values()) == {"finished"}
    assert conn.zcard(queue.ready_job_registry.key) == 0


def test_enqueue_against_a_redis_that_is_down_fails_clearly(tmp_path: Path, demo_data: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("STL_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("STL_HOME", str(tmp_path / "home"))
    code, out, err = enqueue(write_grid(tmp_path, demo_data))
    assert code == 1
    assert "cannot reach Redis" in err and "Traceback" not in err + out


def test_status_json_shape(stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    enqueue(write_grid(tmp_path, demo_data))
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload) == {"runs", "workers", "store"} and payload["store"] is None  # no worker started yet
    assert len(payload["runs"]) == 4
    for run in payload["runs"]:
        assert {"id", "grid", "user", "status", "progress", "cell", "created_at", "started_at", "ended_at",
                "error"} <= set(run)
        assert run["status"] == "queued" and 0.0 <= run["progress"] <= 1.0
        assert set(run["cell"]) == {"model", "mtl", "instructions", "shots", "seed"}
    result = runner.invoke(app, ["status", "--json", "--user", "bob"])
    assert json.loads(result.stdout)["runs"] == []


def test_status_lists_the_latest_failures_with_their_errors(stl_env: Path, conn: redis.Redis, tmp_path: Path,
                                                            demo_data: Path) -> None:
    import yaml

    from stl.jobs.queue.records import RECENT_FAILURES, status_summary

    grid = grid_dict(demo_data)
    grid["grid"]["seed"] = list(range(2))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    enqueue(path)
    run_ids = [text(r) for r in conn.zrange(keys.grid_runs("test-grid"), 0, -1)]
    assert len(run_ids) == 8 > RECENT_FAILURES
    for minute, run_id in enumerate(run_ids[:7]):
        conn.hset(keys.run(run_id), mapping={"status": "failed", "ended_at": 1000.0 + 60 * minute,
                                             "error": f"eval stage x: failure {minute}"})
    summary = status_summary(conn)
    assert [run.id for run in summary.failed] == run_ids[6:1:-1]  # the latest five, latest first
    assert summary.failed[0].error == "eval stage x: failure 6"
    assert [run.id for run in summary.running] == []
    assert status_summary(conn, user="alice").failed == summary.failed
    with pytest.raises(NotFound, match='no runs by user "bob"; users with runs: alice'):
        status_summary(conn, user="bob")


def test_results_of_a_grid_with_no_results_yet_say_so_in_one_line_and_exit_1_in_every_form(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    enqueue(write_grid(tmp_path, demo_data))
    plot = tmp_path / "pivot.png"
    says = ("stl: no results for test-grid yet: its 4 run(s) are still queued or running; "
            "`stl status --grid test-grid` shows their progress\n")
    for form in ([], ["--rows"], ["--json"], ["--csv"], ["--markdown"], ["--rows", "--csv"], ["--plot", str(plot)],
                 ["--effect", "mtl=none:in-domain"], ["--by", "model"]):
        result = runner.invoke(app, ["results", "test-grid", *form])
        assert (result.exit_code, result.stdout, result.stderr) == (1, "", says), form
    assert not plot.exists()
    # One run ended without a result: the rest may still bring some.
    run_ids = [text(r) for r in conn.zrange(keys.grid_runs("test-grid"), 0, -1)]
    conn.hset(keys.run(run_ids[0]), mapping={"status": "failed", "error": "eval stage x: broken"})
    result = runner.invoke(app, ["results", "test-grid", "test-grid"])
    assert result.exit_code == 1 and result.stderr == (
        "stl: no results for test-grid yet: 3 of 4 run(s) are still queued or running (1 failed); "
        "`stl status --grid test-grid` shows their progress\n")
    # A bad option is still bad input (exit 2), results or not; a grid that does not exist too.
    result = runner.invoke(app, ["results", "test-grid", "--effect", "mtl"])
    assert result.exit_code == 2 and "malformed --effect 'mtl'" in result.stderr
    result = runner.invoke(app, ["results", "test-grid", "--effect", "seed=0:1"])
    assert result.exit_code == 2 and "seeds are what each mean is taken over" in result.stderr
    result = runner.invoke(app, ["results", "test-grid", "no-such-grid"])
    assert (result.exit_code, result.stderr) == (2, 'stl: no grid named "no-such-grid"; `stl status` lists the grids\n')


def test_runs_list_in_the_grid_files_order_so_results_rows_do_too(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    from stl.jobs.queue.records import list_runs
    from stl.jobs.results.analysis import build_pivot

    grid = grid_dict(demo_data)
    grid["grid"].update(model=["tiny:t5", "tiny:bart"], instructions=[True, False], mtl=["none"], shots=[4, 0],
                        seed=[1, 0])
    import yaml

    path = tmp_path / "ordered.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    assert enqueue(path)[0] == 0
    listed = [run.cell for run in list_runs(conn, grid="test-grid")]
    assert listed == [run.cell for run in parse_grid(path).runs]  # not the order of the run ids
    assert len({tuple(c.values()) for c in listed}) == 16
    pivot = build_pivot([], [{"grid": "test-grid", "run": str(i), "cell": cell, "status": "queued"}
                             for i, cell in enumerate(listed)])
    # strings and booleans as the file lists them; numbers ascending
    assert [row.key for row in pivot.rows] == [(m, "none", i, s) for m in ("tiny:t5", "tiny:bart")
                                               for i in (True, False) for s in (0, 4)]


def test_runs_record_the_work_of_their_stages_and_of_those_already_done(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    path = write_grid(tmp_path, demo_data)
    expanded = parse_grid(path)
    mtl_stage = next(sid for sid, spec in expanded.stages.items() if spec.kind.value == "mtl")
    conn.hset(keys.stage(mtl_stage), "status", "finished")  # as if an earlier grid had trained it
    assert enqueue(path)[0] == 0
    for run in expanded.runs:
        work = [expanded.stages[sid].work for sid in run.stages]
        total, done = conn.hmget(keys.run(run.run_id), "work_total", "work_done")
        assert int(total) == sum(work) and int(done) == (work[0] if mtl_stage in run.stages else 0)
    assert expanded.stages[mtl_stage].work == 6 * 4  # max_steps x batch_size
    # batch_size is a step's whole batch, however many micro-batches accumulate it
    accumulated = expanded.stages[mtl_stage].model_copy(
        update={"train": expanded.stages[mtl_stage].train.model_copy(update={"grad_accum": 4})})  # type: ignore[union-attr]
    assert accumulated.work == 6 * 4
    eval_stage = next(sid for sid, spec in expanded.stages.items() if spec.kind.value == "eval")
    assert int(conn.hget(keys.stage(eval_stage), "work")) == expanded.stages[eval_stage].work


def test_a_worker_that_cannot_write_stl_home_takes_no_job(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert enqueue(write_grid(tmp_path, demo_data))[0] == 0
    before = queued_job_ids(conn, "alice")
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    monkeypatch.setenv("STL_HOME", str(a_file / "home"))
    result = runner.invoke(app, ["worker", "--burst"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"stl: STL_HOME {a_file / 'home'} cannot be written (Not a directory")
    assert result.stderr.count("\n") == 1
    # nothing was taken, so nothing failed on it
    assert queued_job_ids(conn, "alice") == before
    assert {text(conn.hget(keys.run(r.decode()), "status")) for r in conn.zrange(keys.RUNS, 0, -1)} == {"queued"}
    # Notification settings that could never work are said at the start too, not when the first grid ends.
    monkeypatch.setenv("STL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STL_NOTIFY_CMD", "no-such-program-here --x")
    monkeypatch.setenv("STL_NOTIFY_URL", "hooks.example.com/services/SECRET")
    result = runner.invoke(app, ["worker", "--burst"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "STL_NOTIFY_CMD names 'no-such-program-here', which is not a program on PATH" in result.stderr
    assert "STL_NOTIFY_URL must be an http:// or https:// URL" in result.stderr and "SECRET" not in result.stderr
    assert queued_job_ids(conn, "alice") == before


def test_an_empty_grid_name_is_no_grid_and_a_run_named_twice_is_one_run(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    assert enqueue(write_grid(tmp_path, demo_data))[0] == 0
    result = runner.invoke(app, ["status", "--once", "--grid", "test-grid", "--user", "carol"])
    assert result.exit_code == 2 and 'user "carol" has no runs in grid "test-grid"' in result.stderr, result.stderr
    for args in (["results", ""], ["status", "--grid", "", "--once"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.stderr == 'stl: no grid named ""; `stl status` lists the grids\n'
    run_id = text(conn.zrange(keys.RUNS, 0, 0)[0])
    result = runner.invoke(app, ["logs", run_id])
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr.startswith(f"stl: run {run_id} ") and result.stderr.count("\n") == 1, result.stderr
    assert "none of its stages has started" in result.stderr and "`stl status`" in result.stderr
    result = runner.invoke(app, ["cancel", run_id, run_id[:8]])
    assert result.exit_code == 0 and result.stdout.startswith("canceled 1 of 1 run(s)"), result.output
    assert "canceled" in runner.invoke(app, ["logs", run_id]).stderr


def test_a_cancel_and_the_end_of_a_stage_racing_for_a_run_cannot_overwrite_each_other(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stl.jobs.queue import queueing
    from stl.jobs.queue.entry import finish_stage
    from stl.jobs.states import RunStatus

    grid = grid_dict(demo_data)
    grid["grid"].update(model=["tiny:bart"], mtl=["none"], shots=[0], seed=[0, 1])
    expanded = parse_grid(write_grid(tmp_path, demo_data, grid=grid["grid"]))
    submit_runs(conn, expanded.runs, expanded.stages, user="alice", priority="normal", stage_timeout=60)
    first, second = expanded.runs
    # The worker finishes the first run's only stage after the cancel read the run as live...
    stale = queueing.load_runs(conn, [first.run_id])
    [stage_id] = first.stages
    # A run is finished only with a result for each of its eval tasks.
    metrics = [{"task": task, "value": 0.5} for task in grid["tasks"]["eval"]]
    finish_stage(conn, load_settings(), stage_id, expanded.stages[stage_id], status=RunStatus.finished, error="",
                 started=0.0, user="alice", result={"metrics": metrics})
    assert text(conn.hget(keys.run(first.run_id), "status")) == "finished"
    monkeypatch.setattr(queueing, "load_runs", lambda *_args: stale)
    canceled, already, _ = queueing.cancel_runs(conn, [first.run_id], user="alice", force=False)
    monkeypatch.undo()
    # ...and the finished run stays finished, reported as already ended.
    assert (canceled, already) == ([], [first.run_id])
    assert text(conn.hget(keys.run(first.run_id), "status")) == "finished"

    # The other way round: a run canceled while its stage ran is not put back in the queue by that stage's end.
    [other_stage] = second.stages
    queueing.cancel_runs(conn, [second.run_id], user="alice", force=False)
    finish_stage(conn, load_settings(), other_stage, expanded.stages[other_stage], status=RunStatus.finished,
                 error="", started=0.0, user="alice", result={"metrics": metrics})
    assert text(conn.hget(keys.run(second.run_id), "status")) == "canceled"
    assert not conn.exists(keys.run_results(second.run_id))


def test_the_submit_itself_refuses_a_grid_another_user_took_meanwhile(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    from stl.jobs.errors import GridChanged

    expanded = parse_grid(write_grid(tmp_path, demo_data))
    # bob's check found the name free, then alice's enqueue of the same name landed first
    submit_runs(conn, expanded.runs[:1], expanded.stages, user="alice", priority="normal", stage_timeout=60,
                owner_only=True)
    written = conn.dbsize()
    with pytest.raises(GridChanged, match='grid "test-grid" belongs to alice'):
        submit_runs(conn, expanded.runs, expanded.stages, user="bob", priority="normal", stage_timeout=60,
                    owner_only=True)
    assert conn.dbsize() == written  # nothing of bob's was written


def test_a_stage_another_enqueue_starts_sharing_while_it_is_canceled_stays_queued(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stl.jobs.queue import queueing

    grid = grid_dict(demo_data)
    grid["grid"].update(model=["tiny:bart"], mtl=["none"], shots=[0], seed=[0])
    alice = parse_grid(write_grid(tmp_path, demo_data, grid=grid["grid"]))
    bob = parse_grid(write_grid(tmp_path, demo_data, filename="bob.yaml", name="bobs-grid", grid=grid["grid"]))
    [stage_id] = alice.runs[0].stages
    assert bob.runs[0].stages == (stage_id,)  # the same stage: content-addressed
    submit_runs(conn, alice.runs, alice.stages, user="alice", priority="normal", stage_timeout=60)
    real_fetch = queueing.Job.fetch

    def bob_enqueues_first(*args: object, **kwargs: object) -> Job:
        # bob's enqueue lands between alice's cancel deciding the stage is unneeded and RQ's job being canceled
        submit_runs(conn, bob.runs, bob.stages, user="bob", priority="normal", stage_timeout=60)
        return real_fetch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(queueing.Job, "fetch", bob_enqueues_first)
    queueing.cancel_runs(conn, [alice.runs[0].run_id], user="alice", force=False)
    monkeypatch.undo()
    assert text(conn.hget(keys.run(bob.runs[0].run_id), "status")) == "queued"
    assert text(conn.hget(keys.stage(stage_id), "status")) == "queued"
    job = Job.fetch(job_id_for(stage_id), connection=conn, serializer=JSONSerializer)
    assert job.get_status() == "queued" and job_id_for(stage_id) in queued_job_ids(conn, "bob")


def test_a_run_queued_again_while_its_canceled_stage_still_runs_clears_the_cancel(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    from stl.jobs.queue import queueing

    grid = grid_dict(demo_data)
    grid["grid"].update(model=["tiny:bart"], mtl=["none"], shots=[0], seed=[0])
    expanded = parse_grid(write_grid(tmp_path, demo_data, grid=grid["grid"]))
    submit_runs(conn, expanded.runs, expanded.stages, user="alice", priority="normal", stage_timeout=60)
    [run] = expanded.runs
    [stage_id] = run.stages
    conn.hset(keys.stage(stage_id), "status", "running")  # a work horse has it
    queueing.cancel_runs(conn, [run.run_id], user="alice", force=False)
    assert text(conn.hget(keys.stage(stage_id), "cancel")) == "alice"  # the horse would stop at its next step
    report = queueing.retry_runs(conn, [run.run_id], user="alice", force=False)
    assert report[0] == [run.run_id]
    assert not conn.hget(keys.stage(stage_id), "cancel")  # the retried run needs it: it runs on


def test_results_of_a_grid_whose_runs_all_ended_without_results_do_not_say_yet(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    enqueue(write_grid(tmp_path, demo_data))
    for run_id in [text(r) for r in conn.zrange(keys.grid_runs("test-grid"), 0, -1)]:
        conn.hset(keys.run(run_id), mapping={"status": "failed", "error": "eval stage x: broken"})
    result = runner.invoke(app, ["results", "test-grid"])
    assert result.exit_code == 1 and result.stdout == ""
    first = text(conn.zrange(keys.grid_runs("test-grid"), 0, 0)[0])
    assert result.stderr == ("stl: no results for test-grid: none of its 4 run(s) finished (4 failed); `stl logs RUN` "
                             f"says why, e.g. run {first[:10]}: eval stage x: broken\n")
    for run_id in [text(r) for r in conn.zrange(keys.grid_runs("test-grid"), 0, -1)]:
        conn.hset(keys.run(run_id), mapping={"status": "canceled", "error": "canceled by alice"})
    result = runner.invoke(app, ["results", "test-grid", "--json"])
    assert result.exit_code == 1 and result.stdout == "" and result.stderr == (
        "stl: no results for test-grid: none of its 4 run(s) finished (4 canceled); `stl retry --grid test-grid` "
        "queues them again\n")


def test_runs_whose_stages_are_all_done_are_said_to_finish_at_once(stl_env: Path, conn: redis.Redis,
                                                                    tmp_path: Path, demo_data: Path) -> None:
    code, _, err = enqueue(write_grid(tmp_path, demo_data))
    assert code == 0, err
    for stage_id in parse_grid(write_grid(tmp_path, demo_data)).stages:
        conn.hset(keys.stage(stage_id), "status", "finished")  # as the worker leaves them
    code, out, err = enqueue(write_grid(tmp_path, demo_data, filename="again.yaml", name="again"))
    assert code == 0, err
    assert "queued 4 run(s) of grid again" in out
    assert "4 of the queued run(s) finished at once" in out, out
    assert set(run_statuses(conn, "again").values()) == {"finished"}
    assert "watch them with" not in out
    statuses = {text(conn.hget(keys.run(text(r)), "status")) for r in conn.zrange(keys.grid_runs("again"), 0, -1)}
    assert statuses == {"finished"}


def test_an_unknown_run_id_is_refused_with_where_runs_go(stl_env: Path, conn: redis.Redis) -> None:
    result = runner.invoke(app, ["logs", "89aceb"])
    assert result.exit_code != 0 and result.stdout == ""
    assert result.stderr.strip() == ('stl: no run id starts with "89aceb" (a run `stl enqueue --replace` dropped '
                                     "is gone); `stl status --json` lists them")
