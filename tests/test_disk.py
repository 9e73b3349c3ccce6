"""`stl disk`: what STL_HOME holds, clearing its caches, and pruning stage models no live run needs."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
import yaml
from typer.testing import CliRunner

from stl.cli.main import app
from stl.cli.render import disk_rows, prune_lines
from stl.jobs import keys
from stl.jobs.errors import UsageError
from stl.jobs.grid.parse import ExpandedGrid, parse_grid
from stl.jobs.humanize import format_bytes
from stl.jobs.queue.disk import clear_caches, disk_usage, prune_stage_models
from stl.jobs.queue.queueing import job_id_for, submit_runs
from stl.jobs.settings import load_settings
from stl.jobs.states import PruneTarget, StageKind
from tests.helpers import grid_dict, write_grid

if TYPE_CHECKING:
    from pathlib import Path

    import redis

runner = CliRunner()


def populate(home: Path) -> None:
    for relative, size in [("cache/tokens/a.safetensors", 1000), ("cache/index/b.safetensors", 24),
                           ("cache/inductor/fx/c.py", 3000), ("stages/s1/model/model.safetensors", 5000),
                           ("runs/r1/results.json", 10)]:
        path = home / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)


def test_usage_lists_caches_first_with_their_sizes(stl_env: Path) -> None:
    populate(stl_env)
    (stl_env / "stages" / "s1" / "spec.json").write_text(json.dumps({"kind": "finetune"}))
    usage = {u.name: (u.files, u.bytes, u.freed_by) for u in disk_usage(load_settings())}
    assert list(usage) == ["cache/inductor", "cache/tokens", "cache/index", "models/mtl", "models/finetune",
                           "stages", "runs", "redis"]
    assert usage["cache/inductor"] == (1, 3000, "--clear-caches")
    assert usage["models/finetune"] == (1, 5000, "--prune finetune") and usage["models/mtl"] == (0, 0, "--prune mtl")
    assert usage["stages"] == (1, 20, "") and usage["redis"] == (0, 0, "")  # spec.json: the rest of the stage
    rows = disk_rows(disk_usage(load_settings()))
    assert rows[-1][:3] == ["total", format_bytes(9054), "6"]
    assert [format_bytes(n) for n in (0, 1023, 1536, 5 * 2**30)] == ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"]


def test_clearing_removes_only_the_caches_and_waits_for_idle_workers(stl_env: Path, conn: redis.Redis) -> None:
    populate(stl_env)
    conn.sadd(keys.RUNNING_STAGES, "some-stage")
    refused = runner.invoke(app, ["disk", "--clear-caches"])
    assert refused.exit_code == 1 and "1 stage(s) are running" in refused.stderr
    assert (stl_env / "cache" / "tokens" / "a.safetensors").is_file()

    conn.srem(keys.RUNNING_STAGES, "some-stage")
    result = runner.invoke(app, ["disk", "--clear-caches"])
    assert result.exit_code == 0, result.stderr
    assert "3.9 KiB in 3 file(s)" in result.stdout
    assert list((stl_env / "cache").iterdir()) == []
    assert (stl_env / "stages" / "s1" / "model" / "model.safetensors").is_file()
    assert (stl_env / "runs" / "r1" / "results.json").is_file()


def test_force_clears_under_running_stages(stl_env: Path) -> None:
    populate(stl_env)
    removed = clear_caches(load_settings(), running_stages=2, force=True)
    assert sum(u.files for u in removed) == 3
    assert not (stl_env / "cache" / "inductor").exists()
    populate(stl_env)  # --force needs no Redis: it does not ask which stages run
    result = runner.invoke(app, ["disk", "--clear-caches", "--force"], env={"STL_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 0, result.stderr
    assert not (stl_env / "cache" / "tokens").exists()


def test_the_table_needs_no_redis(stl_env: Path) -> None:
    populate(stl_env)
    result = runner.invoke(app, ["disk"], env={"STL_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 0, result.stderr
    assert "cache/tokens" in result.stdout and "stages" in result.stdout
    assert " free of " in " ".join(result.stdout.split())  # the title, wrapped at 80 columns


def test_a_home_that_does_not_exist_is_said_not_shown_as_empty(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    result = runner.invoke(app, ["disk"], env={"STL_REDIS_URL": "redis://127.0.0.1:1/0", "STL_HOME": str(missing)})
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr.startswith(f"stl: STL_HOME {missing} does not exist: nothing has run with it yet")
    assert not missing.exists()


# --- pruning stage models ----------------------------------------------------------------------


def finished_grid(conn: redis.Redis, home: Path, path: Path) -> ExpandedGrid:
    """Enqueue the grid at `path`, then make it look run: every stage and run finished, and every
    training stage's directory holding a model, as a worker leaves them."""
    expanded = parse_grid(path)
    submit_runs(conn, expanded.runs, expanded.stages, user="alice", priority="normal", stage_timeout=60)
    for sid, spec in expanded.stages.items():
        conn.hset(keys.stage(sid), "status", "finished")
        stage_dir = home / "stages" / sid
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "spec.json").write_text(spec.model_dump_json())
        (stage_dir / "done.json").write_text("{}")
        if spec.kind != StageKind.eval:
            (stage_dir / "model").mkdir()
            (stage_dir / "model" / "model.safetensors").write_bytes(b"w" * 1000)
    for run in expanded.runs:
        conn.hset(keys.run(run.run_id), "status", "finished")
    return expanded


def stage_ids(expanded: ExpandedGrid, kind: StageKind) -> list[str]:
    return sorted(sid for sid, spec in expanded.stages.items() if spec.kind == kind)


def test_pruning_deletes_models_no_live_run_needs_and_marks_their_stages(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    expanded = finished_grid(conn, stl_env, write_grid(tmp_path, demo_data))
    finetunes, mtls = stage_ids(expanded, StageKind.finetune), stage_ids(expanded, StageKind.mtl)
    assert len(finetunes) == 4 and len(mtls) == 1
    live_run = next(r for r in expanded.runs if finetunes[0] in r.stages)
    conn.hset(keys.run(live_run.run_id), "status", "queued")  # e.g. retried: its stages are needed
    conn.set(keys.stage_lease(finetunes[1]), "host:123")  # a work horse holds this one

    settings = load_settings()
    preview = prune_stage_models(conn, settings, PruneTarget.finetune, user="alice", dry_run=True)
    assert all((stl_env / "stages" / sid / "model").is_dir() for sid in finetunes)
    assert not any(conn.hget(keys.stage(sid), "pruned") for sid in finetunes)

    report = prune_stage_models(conn, settings, PruneTarget.finetune, user="alice")
    pruned = sorted(m.stage_id for m in report.pruned)
    assert pruned == sorted(m.stage_id for m in preview.pruned)
    needed = {m.stage_id for m in report.needed}
    assert needed == {sid for sid in finetunes if sid in live_run.stages} | {finetunes[1]}
    assert set(pruned) == set(finetunes) - needed and pruned
    assert report.freed_bytes == 1000 * len(pruned)
    # two few-shot stages per task and seed, told apart by where they start
    abouts = {m.about for m in preview.pruned + preview.needed}
    assert f"tiny:bart summarization 4-shot 6 steps from MTL stage {mtls[0][:8]} seed 0" in abouts
    assert "tiny:bart summarization 4-shot 6 steps from the base model seed 0" in abouts
    for sid in pruned:
        stage_dir = stl_env / "stages" / sid
        assert not (stage_dir / "model").exists() and not (stage_dir / "done.json").exists()
        assert json.loads((stage_dir / "pruned.json").read_text())["by"] == "alice"
        assert conn.hget(keys.stage(sid), "status") == b"finished" and conn.hget(keys.stage(sid), "pruned")
        assert not conn.exists(keys.stage_lease(sid))  # the lease taken while deleting is given back
    for sid in needed:
        assert (stl_env / "stages" / sid / "model").is_dir()
    assert conn.get(keys.stage_lease(finetunes[1])) == b"host:123"
    assert (stl_env / "stages" / mtls[0] / "model").is_dir()  # --prune finetune leaves MTL models

    lines = prune_lines(report, "finetune", dry_run=False)
    assert lines[-2].startswith(f"pruned {len(pruned)} finetune model(s), ")
    assert lines[-1].startswith(f"kept {len(needed)} ")


def test_models_unknown_to_this_redis_are_left_alone(stl_env: Path, conn: redis.Redis) -> None:
    stage_dir = stl_env / "stages" / ("a" * 16)
    (stage_dir / "model").mkdir(parents=True)
    (stage_dir / "spec.json").write_text(json.dumps({"kind": "mtl"}))
    result = runner.invoke(app, ["disk", "--prune", "all"])
    assert result.exit_code == 0, result.stderr
    assert "pruned 0 stage model(s)" in result.stdout and "left 1 (0 B) alone" in result.stdout
    assert (stage_dir / "model").is_dir()


def test_pruning_is_refused_in_an_stl_home_that_is_not_the_queues_store(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stl.jobs.queue.store import claim_store

    expanded = finished_grid(conn, stl_env, write_grid(tmp_path, demo_data))
    queue_store = claim_store(conn, load_settings())  # what the queue's first worker does
    other = tmp_path / "another-home"
    finished_grid(conn, other, write_grid(tmp_path, demo_data))  # the same stages, trained in another folder
    monkeypatch.setenv("STL_HOME", str(other))
    result = runner.invoke(app, ["disk", "--prune", "all"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr == (
        f"stl: cannot prune models in STL_HOME {other}: it is not the store the workers of this Redis share "
        f"({stl_env} on {queue_store.host}, store {queue_store.short}), whose records it would change; run it "
        "where STL_HOME is that folder\n")
    assert not any(conn.hget(keys.stage(sid), "pruned") for sid in expanded.stages)
    assert all((other / "stages" / sid / "model").is_dir() for sid in stage_ids(expanded, StageKind.mtl))
    # `stl disk` alone reads only the folder, and names its store id
    result = runner.invoke(app, ["disk"])
    assert result.exit_code == 0 and "· store" not in result.stdout, result.stdout
    monkeypatch.setenv("STL_HOME", str(stl_env))
    result = runner.invoke(app, ["disk"])
    assert f"· store {queue_store.short}" in " ".join(result.stdout.split()), result.stdout
    result = runner.invoke(app, ["disk", "--prune", "all", "--dry-run"])
    assert result.exit_code == 0 and "would prune 5 stage model(s)" in result.stdout, result.output


def test_prune_options_are_checked(stl_env: Path) -> None:
    for args in (["--dry-run"], ["--prune", "all", "--clear-caches"], ["--prune", "eval"], ["--force"]):
        result = runner.invoke(app, ["disk", *args])
        assert result.exit_code == 2, (args, result.stdout)
        assert "Traceback" not in result.stdout + result.stderr


def test_a_pruned_stage_trains_again_only_when_a_new_stage_starts_from_it(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    expanded = finished_grid(conn, stl_env, write_grid(tmp_path, demo_data))
    [mtl] = stage_ids(expanded, StageKind.mtl)
    result = runner.invoke(app, ["disk", "--prune", "all"])
    assert result.exit_code == 0, result.stderr
    assert "pruned 5 stage model(s)" in result.stdout

    # The same cells in another grid: every stage is finished or pruned, so nothing trains.
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump({**grid_dict(demo_data), "name": "same-cells"}))
    again = parse_grid(same)
    report = submit_runs(conn, again.runs, again.stages, user="alice", priority="normal", stage_timeout=60)
    assert report.stages_created == 0 and len(report.queued) == 4
    assert {conn.hget(keys.run(r), "status") for r in report.queued} == {b"finished"}

    # New eval settings: new eval stages, so their pruned parents (and theirs) train again, in order.
    changed = grid_dict(demo_data, name="longer-answers")
    changed["eval"] = {**changed["eval"], "max_new_tokens": 9}  # new eval stages, same few-shot ones
    changed_path = tmp_path / "changed.yaml"
    changed_path.write_text(yaml.safe_dump(changed))
    new = parse_grid(changed_path)
    report = submit_runs(conn, new.runs, new.stages, user="alice", priority="normal", stage_timeout=60)
    new_finetunes = stage_ids(new, StageKind.finetune)
    assert stage_ids(new, StageKind.mtl) == [mtl] and set(new_finetunes) == set(stage_ids(expanded, StageKind.finetune))
    # 1 MTL + 4 finetune retrained, and 2 + 4 new eval stages
    assert report.stages_created == 11 and report.stages_retrained == 5
    assert conn.hget(keys.stage(mtl), "status") == b"queued" and not conn.hget(keys.stage(mtl), "pruned")
    for sid in new_finetunes:
        spec = new.stages[sid]
        job = conn.hgetall(f"rq:job:{job_id_for(sid)}")
        if spec.parent == mtl:  # waits for the MTL stage to train again
            assert job[b"status"] == b"deferred" and job[b"dependency_id"] == job_id_for(mtl).encode()
        else:
            assert job[b"status"] == b"queued"


def test_the_prune_setting_is_an_on_off_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in [("1", True), (" Yes", True), ("on", True), ("0", False), ("", False), ("no", False)]:
        monkeypatch.setenv("STL_PRUNE_FINETUNE", value)
        assert load_settings().prune_finetune is expected, value
    for value in ("2", "prune", "onn"):
        monkeypatch.setenv("STL_PRUNE_FINETUNE", value)
        with pytest.raises(UsageError, match=f"STL_PRUNE_FINETUNE='{value}' is neither on nor off"):
            load_settings()


def test_other_users_models_are_theirs_to_prune_unless_forced(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    finished_grid(conn, stl_env, write_grid(tmp_path, demo_data))  # alice's runs
    monkeypatch.setenv("STL_USER", "bob")
    result = runner.invoke(app, ["disk", "--prune", "all"])
    assert result.exit_code == 0, result.stderr
    assert "pruned 0 stage model(s)" in result.stdout
    assert any("left 5 (4.9 KiB)" in line and "alice" in line and "--force" in line
               for line in result.stdout.splitlines()), result.stdout
    assert len(list((stl_env / "stages").glob("*/model"))) == 5
    result = runner.invoke(app, ["disk", "--prune", "all", "--force"])
    assert result.exit_code == 0 and "pruned 5 stage model(s)" in result.stdout, result.stdout
    assert not list((stl_env / "stages").glob("*/model"))


def test_an_stl_home_that_is_a_file_is_named_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "home"
    a_file.write_text("")
    monkeypatch.setenv("STL_HOME", f"{a_file} ")  # pasted with a trailing space: stripped
    result = runner.invoke(app, ["disk"])
    assert result.exit_code == 2 and result.stderr == f"stl: STL_HOME {a_file} is a file, not a folder; point " \
        "STL_HOME at a folder\n", result.stderr
