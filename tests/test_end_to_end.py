"""A grid from enqueue to results, through a real `stl worker --burst` and a real redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
import yaml
from typer.testing import CliRunner

from stl.cli.main import app
from stl.jobs import keys
from stl.jobs.grid.parse import parse_grid
from stl.jobs.specs import StageKind
from tests.conftest import REPO
from tests.helpers import grid_dict, write_grid
from tests.test_faults import child_env

if TYPE_CHECKING:
    from pathlib import Path

    import redis

pytestmark = pytest.mark.slow
runner = CliRunner()


def run_worker(timeout: int = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "stl.cli.main", "worker", "--burst"], capture_output=True,
                            text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (args, result.stderr, result.stdout)
    return result.stdout


def test_grid_runs_to_results(stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    notified = tmp_path / "notified.json"
    hook = tmp_path / "hook.py"
    hook.write_text("import sys, json, pathlib\n"
                    f"pathlib.Path({str(notified)!r}).write_text(json.dumps({{'argv': sys.argv[1:], "
                    "'stdin': json.loads(sys.stdin.read())}))\n")
    monkeypatch.setenv("STL_NOTIFY_CMD", f"{sys.executable} {hook}")
    path = write_grid(tmp_path, demo_data)
    expanded = parse_grid(path)
    assert "queued 4 run(s)" in cli("enqueue", str(path))
    run_worker()

    status = json.loads(cli("status", "--json"))
    assert [r["status"] for r in status["runs"]] == ["finished"] * 4
    assert all(r["progress"] == 1.0 and r["ended_at"] >= r["started_at"] for r in status["runs"])

    # every distinct stage ran exactly once: the shared MTL stage served both of its runs
    for stage_id, spec in expanded.stages.items():
        log = (stl_env / "stages" / stage_id / "log.txt").read_text()
        assert log.count(" started on ") == 1, (spec.kind, log)
    mtl_ids = [s for s, spec in expanded.stages.items() if spec.kind == StageKind.mtl]
    assert len(mtl_ids) == 1 and conn.scard(keys.stage_runs(mtl_ids[0])) == 2
    for run in expanded.runs:  # every stage's work was counted once, by whichever run's stage it was
        total, done = conn.hmget(keys.run(run.run_id), "work_total", "work_done")
        assert int(total) == int(done) == sum(expanded.stages[sid].work for sid in run.stages)

    results = json.loads(cli("results", "test-grid", "--json"))
    assert results["grid"] == "test-grid"
    rows = results["rows"]
    assert len(rows) == 4 * 2
    for row in rows:
        assert set(row) == {"run", "cell", "task", "task_type", "metric", "value", "metrics"}
        assert 0.0 <= row["value"] <= 1.0 and row["metrics"][row["metric"]] == row["value"]
        expected = {"emotion_classification": ("classification", "accuracy"),
                    "summarization": ("generation", "rougeL")}[row["task"]]
        assert (row["task_type"], row["metric"]) == expected
        recorded = {"classification": {"accuracy", "accuracy_norm", "accuracy_gen"}, "generation": {"rougeL"}}
        assert set(row["metrics"]) == recorded[row["task_type"]]
    assert (stl_env / "runs" / rows[0]["run"] / "metrics.json").is_file()
    record = json.loads((stl_env / "runs" / rows[0]["run"] / "run.json").read_text())
    assert record["status"] == "finished" and record["progress"] == 1.0 and isinstance(record["cell"], dict)

    markdown = cli("results", "test-grid", "--markdown")
    assert markdown.startswith("| model | mtl | instructions | shots |")
    effect = cli("results", "test-grid", "--effect", "mtl=none:in-domain")
    assert "Effect of mtl" in effect
    png = tmp_path / "pivot.png"
    cli("results", "test-grid", "--plot", str(png))
    assert png.stat().st_size > 10_000

    mtl_run = next(r.run_id for r in expanded.runs if r.cell["mtl"] == "in-domain")
    curves = tmp_path / "curves.png"
    cli("plot", mtl_run[:8], "--out", str(curves))
    assert curves.stat().st_size > 10_000
    log = cli("logs", mtl_run)
    assert "stage mtl" in log and "finished in" in log

    payload = json.loads(notified.read_text())
    assert payload["argv"] == ["test-grid"]
    assert payload["stdin"]["grid"] == "test-grid" and payload["stdin"]["finished"] == 4

    # enqueuing again skips everything; a new grid with the same cells reuses every stage at once
    assert "queued 0 run(s)" in cli("enqueue", str(path))
    again = grid_dict(demo_data)
    again["name"] = "same-cells"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(again))
    out = cli("enqueue", str(other))
    assert "queued 4 run(s)" in out and "0 new stage job(s)" in out
    reused = json.loads(cli("results", "same-cells", "--json"))["rows"]
    assert sorted(r["value"] for r in reused) == sorted(r["value"] for r in rows)
    assert status["workers"] == []  # a --burst worker takes its record with it when it exits


def test_a_stage_runs_right_after_its_parent_so_runs_finish_one_by_one(
    stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path
) -> None:
    """Two runs, each an MTL stage then an eval stage, on one worker: each eval follows its own MTL stage
    (depth first), rather than both MTL stages first and both evals at the end."""
    path = write_grid(tmp_path, demo_data, grid={"model": ["tiny:bart"], "mtl": ["in-domain"], "instructions": [True],
                                                  "shots": [0], "seed": [0, 1]})
    expanded = parse_grid(path)
    assert len(expanded.stages) == 4
    cli("enqueue", str(path))
    run_worker()
    started = sorted((float(conn.hget(keys.stage(sid), "started_at") or 0), sid) for sid in expanded.stages)
    order = [expanded.stages[sid] for _at, sid in started]
    assert [spec.kind for spec in order] == [StageKind.mtl, StageKind.eval] * 2
    assert order[1].parent == started[0][1] and order[3].parent == started[2][1]


def test_running_run_is_canceled_within_seconds(stl_env: Path, conn: redis.Redis, tmp_path: Path,
                                                demo_data: Path) -> None:
    grid = grid_dict(demo_data)
    grid["grid"] = {"model": "tiny:bart", "mtl": "in-domain", "shots": 0, "seed": 0}
    grid["train"] = {**grid["train"], "max_steps": 100_000, "checkpoint_every": 1000}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(grid))
    cli("enqueue", str(path))
    (run,) = parse_grid(path).runs
    worker = subprocess.Popen([sys.executable, "-m", "stl.cli.main", "worker", "--burst"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import time

        deadline = time.monotonic() + 120
        while conn.hget(keys.stage(run.stages[0]), "status") != b"running" or \
                int(conn.hget(keys.stage(run.stages[0]), "step") or 0) < 2:
            assert time.monotonic() < deadline, "the stage never started"
            time.sleep(0.2)
        asked = time.monotonic()
        cli("cancel", run.run_id)
        while conn.hget(keys.stage(run.stages[0]), "status") != b"canceled":
            assert time.monotonic() - asked < 20, "the running stage did not stop"
            time.sleep(0.2)
        output, _ = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert conn.hget(keys.run(run.run_id), "status") == b"canceled"
    # a cancel is an expected end: one line in the worker's log, not a traceback
    assert "ended: StageCanceled: " in output and "Traceback" not in output, output[-3000:]
    assert "canceled by alice: " in cli("logs", run.run_id)  # whoever canceled it, in the run's log
    # the eval stage that depended on it never runs
    assert conn.hget(keys.stage(run.stages[1]), "status") == b"canceled"


def test_pruned_models_train_again_when_a_new_stage_needs_them(stl_env: Path, conn: redis.Redis, tmp_path: Path,
                                                               demo_data: Path) -> None:
    grid = grid_dict(demo_data, name="few-shot")
    grid["grid"] = {**grid["grid"], "mtl": "in-domain", "shots": 4}
    path = tmp_path / "few-shot.yaml"
    path.write_text(yaml.safe_dump(grid))
    cli("enqueue", str(path))
    run_worker()
    first = parse_grid(path)
    [mtl] = [sid for sid, spec in first.stages.items() if spec.kind == StageKind.mtl]
    finetunes = sorted(sid for sid, spec in first.stages.items() if spec.kind == StageKind.finetune)
    before = {row["task"]: row["value"] for row in json.loads(cli("results", "few-shot", "--json"))["rows"]}

    out = cli("disk", "--prune", "finetune")
    assert "pruned 2 finetune model(s)" in out
    assert not any((stl_env / "stages" / sid / "model").exists() for sid in finetunes)
    assert (stl_env / "stages" / mtl / "model").is_dir()

    # Generating longer answers makes new eval stages: their few-shot parents train again from
    # the MTL model (kept), deterministically, and the new evals run from them.
    grid["name"] = "few-shot-longer"
    grid["eval"] = {**grid["eval"], "max_new_tokens": 9}
    path.write_text(yaml.safe_dump(grid))
    enqueued = cli("enqueue", str(path))
    assert "4 new stage job(s)" in enqueued and "2 of them train again" in enqueued, enqueued
    run_worker()
    rows = json.loads(cli("results", "few-shot-longer", "--json"))["rows"]
    assert len(rows) == 2 and {row["task"] for row in rows} == set(before)
    for sid in finetunes:
        stage_dir = stl_env / "stages" / sid
        assert (stage_dir / "model").is_dir() and not (stage_dir / "pruned.json").exists()
        assert (stage_dir / "log.txt").read_text().count(" started on ") == 2
        assert any("training again" in line and "stl disk --prune" in line
                   for line in (stage_dir / "log.txt").read_text().splitlines())
        assert not conn.hget(keys.stage(sid), "pruned")
    assert (stl_env / "stages" / mtl / "log.txt").read_text().count(" started on ") == 1


def test_workers_can_prune_few_shot_models_as_runs_finish(stl_env: Path, conn: redis.Redis, tmp_path: Path,
                                                          demo_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STL_PRUNE_FINETUNE", "yes")
    grid = grid_dict(demo_data, name="pruned-as-they-go")
    grid["grid"] = {**grid["grid"], "mtl": "none", "shots": 4, "seed": [0, 1]}
    path = tmp_path / "pruned.yaml"
    path.write_text(yaml.safe_dump(grid))
    cli("enqueue", str(path))
    out = run_worker().stdout
    expanded = parse_grid(path)
    finetunes = [sid for sid, spec in expanded.stages.items() if spec.kind == StageKind.finetune]
    assert len(finetunes) == 4 and out.count("stl prune: deleted 2 few-shot model(s)") == 2, out[-3000:]
    for sid in finetunes:
        assert not (stl_env / "stages" / sid / "model").exists()
        assert "STL_PRUNE_FINETUNE" in (stl_env / "stages" / sid / "pruned.json").read_text()
    rows = json.loads(cli("results", "pruned-as-they-go", "--json"))["rows"]
    assert len(rows) == 2 * 2 and all(0.0 <= row["value"] <= 1.0 for row in rows)


def test_the_demo_grid_shows_in_domain_mtl_helping_the_held_out_tasks(stl_env: Path, conn: redis.Redis) -> None:
    """`make demo`'s grid, as `stl demo` runs it (enqueue, a burst worker, results), shows a positive effect of
    in-domain MTL, with a 95 % interval above zero, on both task types, and seeds that differ.

    This is the guard that MTL checkpoints really feed evaluation: if an eval or few-shot stage started from the
    base model instead of its parent's (say `stages._parent_model_dir` lost the MTL stage), an in-domain cell
    would be built from the same seeded random weights, trained on the same shots, as its mtl=none twin:
    bit-identical scores on a CPU, every comparison 0 %, and this test fails (it does, with eval stages so broken).
    """
    grid = REPO / "grids" / "example.yaml"
    assert "queued 24 run(s)" in cli("enqueue", str(grid))
    result = subprocess.run([sys.executable, "-m", "stl.cli.main", "worker", "--burst"], capture_output=True,
                            text=True, timeout=540, check=False, env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert {r["status"] for r in json.loads(cli("status", "--json"))["runs"]} == {"finished"}

    payload = json.loads(cli("results", "example", "--effect", "mtl=none:in-domain", "--json"))
    effect = payload["effect"]
    summary = json.dumps({key: effect[key] for key in ("overall", "interval_95", "by_type")})
    assert effect["overall"] > 0 and effect["interval_95"][0] > 0, summary
    assert effect["compared"] >= 5, summary  # of 8: zero-shot generation without MTL scores 0, so is skipped
    assert effect["by_type"]["classification"] > 0 and effect["by_type"]["generation"] > 0, summary
    stds = [cell["std"] for row in payload["pivot"]["rows"] for cell in row["cells"].values() if cell]
    assert max(stds) > 0  # the seeds differ: a real spread, not one number three times
