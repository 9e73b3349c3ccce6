"""The status and results tables, tested on the rows the pure builders produce (not on ANSI)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

from stl.cli.render import (
    RUNNING_COLUMNS,
    _fits,
    build_failed_table,
    build_results_table,
    build_running_table,
    build_status_view,
    build_workers_table,
    dry_run_rows,
    enqueue_message,
    failed_rows,
    finished_grid_rows,
    format_cell,
    format_duration,
    result_csv_rows,
    result_markdown,
    results_notes,
    running_columns,
    running_rows,
    summary_rows,
    worker_rows,
)
from stl.jobs import keys
from stl.jobs.ml.progress import StepReport
from stl.jobs.queue.records import GridRow, RunRow, WorkerRow, _run_row, run_rows
from stl.jobs.queue.stage_lease import StageLease
from stl.jobs.queue.stage_reporter import StageReporter, progress_line

if TYPE_CHECKING:
    from pathlib import Path

    import redis


def run_row(**overrides: object) -> RunRow:
    row = RunRow(id="0123456789abcdef", grid="g", user="alice", priority="normal", status="running",
                 progress=0.375, cell={"model": "tiny:bart", "mtl": "none", "shots": 0, "seed": 1},
                 created_at=1.0, started_at=2.0, ended_at=None, error="", stage="mtl", step=30, total=80,
                 loss=2.34567, samples_per_s=10.0, elapsed_s=65.0, eta_s=3725.0)
    for key, value in overrides.items():
        setattr(row, key, value)
    return row


def test_summary_rows_count_each_status_per_user_and_grid() -> None:
    counts = {("g1", "alice", "queued"): 3, ("g1", "alice", "running"): 1, ("g2", "bob", "finished"): 5,
              ("g2", "alice", "failed"): 2}
    assert summary_rows(counts, "user") == [["alice", "3", "1", "0", "2", "0", "6"],
                                            ["bob", "0", "0", "5", "0", "0", "5"]]
    assert summary_rows(counts, "grid") == [["g1", "3", "1", "0", "0", "0", "4"],
                                            ["g2", "0", "0", "5", "2", "0", "7"]]


def test_running_rows_show_progress_step_loss_elapsed_and_eta() -> None:
    (row,) = running_rows([run_row(), run_row(status="queued")])
    assert row["run"] == "0123456789"
    assert row["cell"] == "tiny:bart mtl=none 0-shot seed 1"
    assert (row["stage"], row["step"], row["loss"]) == ("mtl", "30/80", "2.3457")
    assert (row["elapsed"], row["eta"]) == ("1m05s", "1h02m")
    assert row["progress"] == 0.375
    assert row["speed"] == "10.0 ex/s"
    (with_mfu,) = running_rows([run_row(mfu=0.314)])
    assert with_mfu["speed"] == "10.0 ex/s MFU 31%"


class FakeClock:
    """Stands in for the `time` module of stl.jobs.queue.entry: one settable clock for monotonic() and time()."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.strftime = time.strftime

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


def report_at(reporter: StageReporter, clock: FakeClock, step: int, now: float, *, total: int = 100,
              phase: str = "train", micro_batch: int = 4) -> float | None:
    clock.now = now
    report = StepReport(step=step, total=total, loss=1.0, learning_rate=0.1, samples_per_s=1.0, tokens_per_s=1.0,
                        elapsed_s=0.0, micro_batch=micro_batch, grad_accum=1, phase=phase)
    return reporter._eta_s(report)


def test_stage_eta_is_the_pace_since_the_first_report_so_a_slow_first_step_does_not_inflate_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 1 reports after 60 s of loading and compiling, then each step takes 1 s: at step 11 of 100 the
    ETA is 89 s (the pace since step 1), not 70 x (100 - 11) / 11 from the elapsed time."""
    clock = FakeClock()
    monkeypatch.setattr("stl.jobs.queue.stage_reporter.time", clock)
    reporter = StageReporter(None, "s", tmp_path, None)  # type: ignore[arg-type]  (_eta_s needs neither)
    assert report_at(reporter, clock, 1, 1060.0) is None  # the first report: no pace yet
    assert report_at(reporter, clock, 11, 1070.0) == pytest.approx(89.0)
    # Out of memory at step 12: the retry halves the micro-batch, reloads, recompiles and starts again from
    # step 1 (no checkpoint yet). The pace starts over, or the ETA would carry the lost minutes.
    assert report_at(reporter, clock, 1, 1200.0, micro_batch=2) is None
    assert report_at(reporter, clock, 11, 1215.0, micro_batch=2) == pytest.approx(1.5 * 89)
    # A step that goes back (a retry from a checkpoint, same plan) starts over too.
    assert report_at(reporter, clock, 10, 1300.0, micro_batch=2) is None
    # An eval phase has its own pace.
    assert report_at(reporter, clock, 1, 2000.0, total=50, phase="eval") is None
    assert report_at(reporter, clock, 26, 2050.0, total=50, phase="eval") == pytest.approx(48.0)

    record = {"id": "r", "grid": "g", "user": "u", "priority": "normal", "status": "running", "cell": "",
              "created_at": "", "started_at": "", "ended_at": "", "error": "", "n_stages": "2", "stages_done": "0"}
    stage = {"kind": "mtl", "step": "11", "total": "100", "loss": "1.0", "samples_per_s": "1", "mfu": "",
             "started_at": "940", "elapsed_s": "", "status": "running", "eta_s": "89.0", "eta_at": "1070"}
    assert _run_row(record, stage, now=1080.0).eta_s == pytest.approx(79.0)  # counted down since written
    assert _run_row(record, {**stage, "eta_s": "", "eta_at": ""}, now=1080.0).eta_s == pytest.approx(
        140.0 * 89 / 11)  # before a pace exists: elapsed x steps left / steps done


def held_lease(conn: redis.Redis, stage_id: str) -> StageLease:
    """The lease a work horse holds while it reports: its writes are fenced with its token."""
    lease = StageLease(conn, stage_id, "here:1")
    assert lease.acquire()
    return lease


def test_the_eta_goes_through_redis_to_the_status_rows(
    conn: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr("stl.jobs.queue.stage_reporter.time", clock)
    monkeypatch.setattr("stl.jobs.queue.records.time", clock)
    conn.hset(keys.run("r1"), mapping={"id": "r1", "grid": "g", "user": "u", "priority": "normal",
                                       "status": "running", "cell": "{}", "n_stages": "1", "stages_done": "0",
                                       "current_stage": "s1"})
    conn.hset(keys.stage("s1"), mapping={"kind": "mtl", "started_at": "940", "status": "running"})
    reporter = StageReporter(conn, "s1", tmp_path, held_lease(conn, "s1"))
    for step, now in ((1, 1060.0), (11, 1070.0)):
        clock.now = now
        reporter._last_progress = 0.0  # no throttling between these two reports
        reporter.on_step(StepReport(step=step, total=100, loss=1.0, learning_rate=0.1, samples_per_s=1.0,
                                    tokens_per_s=1.0, elapsed_s=0.0, micro_batch=4, grad_accum=1))
    clock.now = 1080.0
    (row,) = run_rows(conn, ["r1"])
    assert row.eta_s == pytest.approx(79.0)


def test_the_stage_log_gets_a_progress_line_at_the_start_every_30_s_and_at_the_end(
    conn: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr("stl.jobs.queue.stage_reporter.time", clock)
    reporter = StageReporter(conn, "s1", tmp_path, held_lease(conn, "s1"))
    for step, now in ((1, 1060.0), (2, 1061.0), (20, 1080.0), (31, 1091.0), (40, 1100.0)):
        clock.now = now
        reporter.on_step(StepReport(step=step, total=40, loss=2.5, learning_rate=0.1, samples_per_s=12.34,
                                    tokens_per_s=1.0, elapsed_s=0.0, micro_batch=4, grad_accum=1, mfu=0.123))
    logged = [line.decode().split(" ", 2)[2] for line in conn.lrange(keys.stage_log("s1"), 0, -1)]
    assert logged == [
        "step 1/40 (2%), loss 2.5000, 12.3 samples/s, MFU 12.3%",
        "step 31/40 (78%), loss 2.5000, 12.3 samples/s, MFU 12.3%, about 9 s left",  # 30 steps in 31 s
        "step 40/40 (100%), loss 2.5000, 12.3 samples/s, MFU 12.3%",
    ]
    assert (tmp_path / "log.txt").read_text().splitlines()[1].endswith("about 9 s left")
    evaluation = StepReport(step=8, total=24, loss=float("nan"), learning_rate=0.0, samples_per_s=4.0,
                            tokens_per_s=0.0, elapsed_s=2.0, micro_batch=8, grad_accum=1, phase="eval")
    assert progress_line(evaluation, 4.0) == "scored 8/24 examples (33%), 4.0 examples/s, about 4 s left"


def test_narrow_terminals_keep_the_columns_that_say_where_a_run_is() -> None:
    assert running_columns(None) == running_columns(160) == RUNNING_COLUMNS
    assert running_columns(100) == ("run", "cell", "stage", "progress", "step", "loss", "speed", "eta")
    assert running_columns(80) == ("run", "cell", "stage", "progress", "eta")
    narrow = build_running_table([run_row()], 80)
    # progress is the whole run's; the step and eta are its current stage's, and the headers say so
    assert [str(column.header) for column in narrow.columns] == ["run", "cell", "stage", "run progress", "stage eta"]
    assert str(narrow.caption) == ("user, grid, step, loss, speed, elapsed hidden at this width; "
                              "widen the terminal to see them")
    assert build_running_table([run_row()], 200).caption is None
    long_grid = [run_row(grid="a-rather-long-grid-name-for-a-study")]
    for width in (100, 120, 160):  # columns give way until what stays fits, cells unsqueezed
        table = build_running_table(long_grid, width)
        assert _fits(table) <= width, (width, [c.header for c in table.columns])
    assert len(build_running_table(long_grid, 160).columns) > len(build_running_table(long_grid, 100).columns)
    # at 80 the five that say where a run is stay, and the cell wraps
    assert len(build_running_table(long_grid, 80).columns) == len(running_columns(80))
    table = build_running_table([], 80)
    assert [[str(c) for c in column.cells] for column in table.columns] == [
        ["—"], ["nothing running"], [""], [""], [""]]


def test_worker_rows_show_gpu_or_cpu() -> None:
    now = time.time()
    gpu = WorkerRow(name="box.gpu0.1", host="box", gpu="NVIDIA H100", gpu_util=87.0, gpu_mem_used_mb=40960.0,
                    gpu_mem_total_mb=81920.0, state="busy", stage="abcdef0123456789", last_seen=now - 2)
    cpu = WorkerRow(name="lap.cpu.2", host="lap", gpu="cpu", gpu_util=None, gpu_mem_used_mb=None,
                    gpu_mem_total_mb=None, state="idle", stage="", last_seen=now)
    rows = worker_rows([gpu, cpu])
    assert rows[0][:5] == ["box.gpu0.1", "box", "NVIDIA H100 87% 40.0/80.0 GiB", "busy", "abcdef012345"]
    assert rows[0][5].endswith("ago") and rows[0][6] == "?"  # a worker of an older stl: no disk reading
    assert rows[1][2:5] == ["cpu", "idle", "—"]
    assert build_workers_table([gpu, cpu]).caption is None


def test_workers_table_warns_when_stl_home_runs_out_of_space() -> None:
    def worker(host: str, free_gib: float, total_gib: float) -> WorkerRow:
        return WorkerRow(name=f"{host}.cpu.1", host=host, gpu="cpu", gpu_util=None, gpu_mem_used_mb=None,
                         gpu_mem_total_mb=None, state="busy", stage="", last_seen=time.time(),
                         disk_free_bytes=free_gib * 2**30, disk_total_bytes=total_gib * 2**30)

    roomy, nearly_full, small_disk = worker("a", 400, 1000), worker("b", 30, 1000), worker("c", 8, 50)
    assert [w.disk_low for w in (roomy, nearly_full, small_disk)] == [False, True, True]
    assert worker_rows([roomy])[0][6] == "400.0 GiB free"
    table = build_workers_table([roomy, nearly_full, small_disk])
    assert "running out of space on b, c" in str(table.caption)
    assert [cell.style for cell in table.columns[6].cells] == ["", "bold red", "bold red"]


def test_a_paused_worker_says_why_in_red() -> None:
    paused = WorkerRow(name="box.gpu0.1", host="box", gpu="cpu", gpu_util=None, gpu_mem_used_mb=None,
                       gpu_mem_total_mb=None, state="paused", stage="", last_seen=time.time(),
                       paused="RuntimeError: CUDA error: unknown error")
    idle = WorkerRow(name="box.gpu1.2", host="box", gpu="cpu", gpu_util=None, gpu_mem_used_mb=None,
                     gpu_mem_total_mb=None, state="idle", stage="", last_seen=time.time())
    table = build_workers_table([paused, idle])
    assert str(table.caption).startswith("box.gpu0.1 takes no work: RuntimeError: CUDA error: unknown error; ")
    assert [cell.style for cell in table.columns[3].cells] == ["bold red", ""]
    assert build_workers_table([idle]).caption is None


def test_finished_grids_show_time_to_completion() -> None:
    done = GridRow(grid="g", total=3, counts={"finished": 2, "failed": 1}, created_at=100.0, ended_at=100.0 + 3725)
    live = GridRow(grid="h", total=2, counts={"finished": 1, "running": 1}, created_at=1.0, ended_at=2.0)
    (row,) = finished_grid_rows([done, live])
    assert row[0:4] == ["g", "2", "1", "0"] and row[5] == "1h02m"
    later = GridRow(grid="k", total=1, counts={"finished": 1}, created_at=100.0, ended_at=9000.0)
    assert [r[0] for r in finished_grid_rows([done, later])] == ["k", "g"]  # the latest first


def test_format_duration() -> None:
    assert [format_duration(s, compact=True) for s in (None, 0, 59, 61, 3600)] == ["—", "0s", "59s", "1m01s", "1h00m"]


def test_dry_run_rows_list_each_run_with_its_stages(tmp_path, demo_data) -> None:  # type: ignore[no-untyped-def]
    from stl.jobs.grid.parse import parse_grid
    from tests.helpers import write_grid

    rows = dry_run_rows(parse_grid(write_grid(tmp_path, demo_data)))
    assert len(rows) == 4
    assert {r[2] for r in rows} == {"eval", "mtl → eval", "finetune → eval → finetune → eval",
                                   "mtl → finetune → eval → finetune → eval"}


def test_one_frame_does_not_say_how_to_quit() -> None:
    from stl.jobs.queue.records import StatusSummary

    summary = StatusSummary(counts={}, grids=[], running=[])
    live = build_status_view(summary, [], 120)
    once = build_status_view(summary, [], 120, live=False)
    assert live.renderables[-1].plain.endswith("Ctrl+C to quit")
    assert once.renderables[-1].plain.startswith("as of ") and "Ctrl+C" not in once.renderables[-1].plain


def test_results_say_which_runs_have_no_results_and_why() -> None:
    runs = [run_row(id=f"{i:016x}", status=status, error=error) for i, (status, error) in enumerate(
        [("finished", ""), ("failed", "finetune stage abc: out of memory"), ("failed", ""), ("canceled", "by bob"),
         ("queued", "")])]
    notes = results_notes(runs)
    assert notes[0] == ("2 of 5 run(s) failed and have no results; `stl logs RUN` says why "
                        "(e.g. run 0000000000: finetune stage abc: out of memory)")
    assert notes[1].startswith("1 of 5 run(s) canceled and have no results; `stl retry RUN`")
    assert notes[2] == "1 of 5 run(s) are still queued or running; their cells show n=k/m"
    assert results_notes(runs[:1]) == []
    many = [run_row(id=f"{i:016x}", status="canceled", error="by bob") for i in range(3)]
    assert "`stl retry RUN` queues them again, or all of them `stl retry --grid " in results_notes(many)[0]


def test_cells_spell_booleans_as_the_grid_file_does() -> None:
    cell = {"model": "tiny:bart", "instructions": True, "seed": 2}
    assert format_cell(cell) == "model=tiny:bart instructions=true seed=2"


def test_result_rows_say_constant_axes_once_in_the_title() -> None:
    rows = [{"run": f"{seed}abcdef0123456", "cell": {"model": "tiny:bart", "instructions": True, "shots": shots,
                                                    "seed": seed},
             "task": "t", "task_type": "generation", "metric": "rougeL", "value": 0.5}
            for shots in (0, 4) for seed in (0, 1)]
    table = build_results_table("g", rows)
    assert str(table.title) == "Results of g: model=tiny:bart instructions=true"
    assert [str(c) for c in table.columns[1].cells] == [
        "shots=0 seed=0", "shots=0 seed=1", "shots=4 seed=0", "shots=4 seed=1"]


def test_failures_show_run_grid_cell_and_error() -> None:
    failed = run_row(status="failed", ended_at=time.time(), error="finetune stage ab12: out of memory")
    [row] = failed_rows([failed])
    assert row[:3] == ["0123456789", "g", "tiny:bart mtl=none 0-shot seed 1"]
    assert row[4] == "finetune stage ab12: out of memory"
    [long] = failed_rows([run_row(status="failed", error="x" * 500)])
    assert len(long[4]) == 120 and long[4].endswith("…")
    # The stage's kind stays, its id goes (the row names the run); a long error is cut between words.
    stage_error = ("finetune stage 0123456789abcdef0123: ModelError: model o/m is not on the Hugging Face hub; "
                   "check the id")
    [row] = failed_rows([run_row(status="failed", error=stage_error)])
    assert row[4] == "finetune: ModelError: model o/m is not on the Hugging Face hub; check the id"
    words = "eval stage 0123456789abcdef0123: ModelError: " + " ".join(["reason"] * 30)
    [row] = failed_rows([run_row(status="failed", error=words)])
    assert len(row[4]) <= 120 and row[4].endswith("reason…"), row[4]
    from stl.jobs.queue.records import StatusSummary

    view = build_status_view(StatusSummary(counts={}, grids=[], running=[], failed=[failed]), [], 120)
    assert any(str(getattr(part, "title", None)) == "Recent failures" for part in view.renderables)
    assert [str(c.header) for c in build_failed_table([failed], 80).columns] == ["run", "cell", "error"]
    assert [str(c.header) for c in build_failed_table([failed], 120).columns] == [
        "run", "grid", "cell", "ended", "error"]
    quiet = build_status_view(StatusSummary(counts={}, grids=[], running=[]), [], 120)
    assert not any(getattr(part, "title", None) == "Recent failures" for part in quiet.renderables)


def test_the_loss_curve_starts_each_stage_where_the_stage_it_starts_from_ended(conn: redis.Redis) -> None:
    import json
    import math

    from stl.jobs.queue.run_details import loss_curve

    def stage(sid: str, parent: str | None, losses: list[float]) -> None:
        kind = sid.split("-")[0].replace("ft", "finetune")
        spec = {"parent": parent, "kind": kind, "tasks": [sid.split("-")[-1]] if parent else ["x", "y"]}
        conn.hset(keys.stage(sid), "spec", json.dumps(spec))
        for step, loss in enumerate(losses, start=1):
            conn.rpush(keys.stage_steps(sid), json.dumps({"step": step, "loss": loss}))

    stage("mtl", None, [3.0, 2.5, 2.2])
    conn.delete(keys.stage_steps("mtl"))  # resumed from a step-1 checkpoint: steps 2 and 3 reported again
    for step, loss in ((1, 3.0), (2, 2.5), (3, 2.2), (2, 2.0), (3, 1.0)):
        conn.rpush(keys.stage_steps("mtl"), json.dumps({"step": step, "loss": loss}))
    stage("ft-a", "mtl", [0.9, 0.8])
    stage("eval-a", "ft-a", [])  # evaluation logs no training steps
    stage("ft-b", "mtl", [0.7, 0.6])
    conn.hset(keys.run("r"), "stages", json.dumps(["mtl", "ft-a", "eval-a", "ft-b"]))
    points, names = loss_curve(conn, "r")
    assert names == ["", "a", "b"]  # the few-shot branches by their task; MTL needs no name
    assert [step for step, _ in points] == [1, 2, 3, 3, 4, 5, 3, 4, 5]  # both few-shot stages branch at step 3
    assert [loss for _, loss in points if not math.isnan(loss)] == [3.0, 2.0, 1.0, 0.9, 0.8, 0.7, 0.6]
    assert [i for i, (_, loss) in enumerate(points) if math.isnan(loss)] == [3, 6]


def test_result_csv_rows_keep_the_grid_order_of_axes_and_spell_booleans_as_the_grid_does() -> None:
    cell = {"model": "tiny:bart", "mtl": "none", "instructions": False, "shots": 0, "seed": 1}
    rows = [{"grid": "g", "run": "r1", "cell": cell, "task": "t", "task_type": "classification",
             "metric": "accuracy", "value": 0.5},
            {"grid": "g", "run": "r2", "cell": {"split": "s1", **cell, "instructions": True}, "task": "t",
             "task_type": "classification", "metric": "accuracy", "value": 1}]
    assert result_csv_rows(rows) == [
        ["grid", "run", "model", "mtl", "instructions", "shots", "seed", "split", "task", "task_type", "metric",
         "value"],
        ["g", "r1", "tiny:bart", "none", "false", "0", "1", "", "t", "classification", "accuracy", "0.5"],
        ["g", "r2", "tiny:bart", "none", "true", "0", "1", "s1", "t", "classification", "accuracy", "1.0"],
    ]
    rows[0]["value"] = 2 / 3
    lines = result_markdown(rows).splitlines()
    assert lines[0].startswith("| grid | run | model |") and lines[1].endswith("| ---: |")
    assert lines[2] == "| g | r1 | tiny:bart | none | false | 0 | 1 |  | t | classification | accuracy | 0.6667 |"
    assert len(lines) == 4


def test_enqueue_message_says_how_to_watch_only_when_something_was_queued() -> None:
    from stl.jobs.queue.queueing import SubmitReport

    nothing = enqueue_message(SubmitReport(grid="g", skipped=["a", "b"]), "alice")
    assert nothing == "queued 0 run(s) of grid g for alice; skipped 2 identical run(s) already queued or finished"
    queued = enqueue_message(SubmitReport(grid="g", queued=["a"], stages_created=2), "alice")
    assert queued.splitlines()[-1] == "watch them with: stl status --grid g"
    # asking for another priority does not move runs already queued: said, not silently ignored
    high = enqueue_message(SubmitReport(grid="g", skipped=["a"]), "alice", "high").splitlines()
    assert high[1].startswith("the skipped runs keep the priority they were queued with, not high")
    assert len(enqueue_message(SubmitReport(grid="g", queued=["b"]), "alice", "high").splitlines()) == 2


def test_run_progress_weighs_each_stage_by_the_examples_it_puts_through_the_model() -> None:
    record = {"id": "r", "grid": "g", "user": "u", "priority": "normal", "status": "running", "cell": "",
              "created_at": "", "started_at": "", "ended_at": "", "error": "", "n_stages": "5", "stages_done": "0",
              "work_total": "32240", "work_done": "0"}
    mtl = {"kind": "mtl", "step": "430", "total": "2000", "loss": "1.0", "samples_per_s": "1", "mfu": "",
           "started_at": "", "elapsed_s": "", "status": "running", "eta_s": "", "eta_at": "", "work": "32000"}
    # an MTL stage of 2000 steps x 16, two few-shot stages of 12 x 8 and two evaluations of 24 examples
    assert _run_row(record, mtl, now=0.0).progress == pytest.approx(430 / 2000 * 32000 / 32240)
    # between stages: the finished ones' work
    queued = {**record, "status": "queued", "stages_done": "1", "work_done": "32000"}
    assert _run_row(queued, None, now=0.0).progress == pytest.approx(32000 / 32240)
    # a run an older stl queued has no work recorded: each stage counts the same
    old = {**record, "work_total": "", "work_done": ""}
    assert _run_row(old, {**mtl, "work": ""}, now=0.0).progress == pytest.approx(430 / 2000 / 5)
    assert _run_row({**record, "status": "finished"}, None, now=0.0).progress == 1.0


def test_status_lists_live_grids_and_only_the_latest_ended_ones() -> None:
    from stl.jobs.queue.records import StatusSummary

    ended = [GridRow(grid=f"old{i}", total=1, counts={"finished": 1}, created_at=100.0 + i, ended_at=200.0 + i)
             for i in range(8)]
    live = GridRow(grid="now", total=2, counts={"finished": 1, "queued": 1}, created_at=1.0, ended_at=None)
    counts = {(g.grid, "alice", status): n for g in [*ended, live] for status, n in g.counts.items()}
    view = build_status_view(StatusSummary(counts=counts, grids=[*ended, live], running=[]), [], 120)
    tables = {str(part.title): part for part in view.renderables if getattr(part, "title", None)}
    assert [str(c) for c in tables["Runs per grid"].columns[0].cells] == ["now"]
    # the user's whole history still counts
    assert [str(c) for c in tables["Runs per user"].columns[-1].cells] == ["10"]
    assert [str(c) for c in tables["Ended grids"].columns[0].cells] == ["old7", "old6", "old5", "old4", "old3"]
    assert str(tables["Ended grids"].caption).startswith("and 3 earlier ended grid(s): `stl results GRID`")
    ended_counts = {key: n for key, n in counts.items() if key[0] != "now"}
    only_ended = build_status_view(StatusSummary(counts=ended_counts, grids=ended, running=[]), [], 120)
    per_grid = next(p for p in only_ended.renderables if str(getattr(p, "title", None)) == "Runs per grid")
    assert [str(c) for c in per_grid.columns[0].cells] == ["none queued or running"]


def test_why_a_grid_has_no_results_is_one_line_that_says_whether_more_may_come() -> None:
    from stl.cli.render import why_no_results

    runs = [run_row(id=f"{n}123456789abcdef", grid="g", status=status, error=error) for n, (status, error) in
            enumerate([("finished", ""), ("failed", "eval stage 0123456789abcdef0123: ModelError: gone")])]
    assert why_no_results(["g"], runs) == "no results for g: its 1 finished run(s) recorded none (1 failed, 1 finished)"
    runs[0].status = "queued"
    assert why_no_results(["g", "h"], runs) == ("no results for g, h yet: 1 of 2 run(s) are still queued or running "
                                                "(1 failed); `stl status` shows their progress")
    runs[0].status = "canceled"
    assert why_no_results(["g"], runs) == ("no results for g: none of its 2 run(s) finished (1 failed, 1 canceled); "
                                           "`stl logs RUN` says why, e.g. run 1123456789: eval: ModelError: gone")
    assert "\n" not in why_no_results(["g"], [run_row(status="failed", error="a\nb")])



def test_a_worker_waiting_for_device_memory_says_why_and_its_gpu_shows_how_it_is_shared() -> None:
    waiting = WorkerRow(name="box.gpu0.1", host="box", gpu="NVIDIA H100", gpu_util=40.0, gpu_mem_used_mb=9000.0,
                        gpu_mem_total_mb=81559.0, state="idle", stage="", last_seen=time.time(), sharing="MPS",
                        waiting="stage 0123456789abcdef0123 needs 9.0 GB, 6.1 GB free [sic]")
    table = build_workers_table([waiting])
    assert str(table.caption) == ("box.gpu0.1 waits for device memory: stage 0123456789abcdef0123 needs 9.0 GB, "
                                  "6.1 GB free [sic]")  # shown as written: LiteralTable makes it no markup
    assert worker_rows([waiting])[0][2].endswith("GiB (MPS)")
