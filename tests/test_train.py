"""The training loop: deterministic resume, cancel/preempt, OOM back-off, reports, and the stage seam."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

import pytest
import torch

from stl.jobs.errors import DataError, ModelError, OutOfMemory, StageCanceled, StagePreempted
from stl.jobs.ml.cuda_graphs import ShapesSeen
from stl.jobs.ml.demo_dataset import DEMO_EVAL_TASKS, DEMO_TRAIN_TASKS
from stl.jobs.ml.stages import StageContext, execute_stage
from stl.jobs.ml.train import OomRetry, _warmup_then_linear_decay
from stl.jobs.specs import EvalConfig, StageKind, StageSpec, TrainConfig
from tests.helpers import (
    assert_bit_identical,
    newest_checkpoint,
    out_of_memory_in_disguise,
    run_training,
    saved_weights,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from stl.jobs.ml.progress import StepReport

# Tiny models gain nothing from a second thread, and lose a lot when other processes share the CPUs.
torch.set_num_threads(1)




def train_spec(demo_data: Path, *, model: str = "tiny:t5", kind: str = "mtl", **settings: Any) -> StageSpec:
    defaults: dict[str, Any] = {
        "max_steps": 9,
        "batch_size": 4,
        "grad_accum": 2,
        "checkpoint_every": 4,
        "max_source_length": 48,
        "max_target_length": 12,
        "learning_rate": 3e-3,
        "warmup_ratio": 0.2,
    }
    tasks = DEMO_TRAIN_TASKS if kind == "mtl" else (DEMO_EVAL_TASKS[1],)
    return StageSpec(
        kind=StageKind(kind),
        model=model,
        data=str(demo_data),
        tasks=tasks,
        shots=6 if kind == "finetune" else 0,
        seed=11,
        train=TrainConfig(**{**defaults, **settings}),
    )


def stop_after(steps: int, request: str) -> Callable[[], str | None]:
    """should_stop() that asks for `request` once `steps` steps have run (it is called before each step)."""
    calls = {"n": 0}

    def should_stop() -> str | None:
        calls["n"] += 1
        return request if calls["n"] > steps else None

    return should_stop


@pytest.mark.parametrize(
    ("model", "kind", "stop_at"),
    [("tiny:t5", "mtl", 5), ("tiny:gpt2", "finetune", 3)],
)
def test_preempted_and_resumed_run_matches_uninterrupted_bit_for_bit(
    tmp_path: Path, demo_data: Path, model: str, kind: str, stop_at: int
) -> None:
    spec = train_spec(demo_data, model=model, kind=kind)
    straight, _ = run_training(spec, tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    with pytest.raises(StagePreempted, match=f"step {stop_at}"):
        run_training(spec, interrupted, should_stop=stop_after(stop_at, "preempt"))
    newest = newest_checkpoint(interrupted)
    assert newest is not None
    state = json.loads((newest / "state.json").read_text())
    assert state["step"] == stop_at and state["data"]["next_batch"] == stop_at
    assert not (interrupted / "model").exists()

    assert prefetch_threads() == []
    resumed, lines = run_training(spec, interrupted)
    assert f"resumed from step {stop_at}" in lines
    assert resumed.resumed_from == stop_at and resumed.steps == straight.steps == 9
    assert_bit_identical(saved_weights(tmp_path / "straight"), saved_weights(interrupted))
    assert not (interrupted / "checkpoint").exists()  # a finished stage drops its checkpoint
    done = json.loads((interrupted / "done.json").read_text())
    assert done["stage_id"] == spec.stage_id and done["train"]["steps"] == 9


DAMAGES = ("truncated trainer.pt", "broken state.json", "missing model.safetensors")


def damage(checkpoint: Path, how: str) -> str:
    """Damage one file of `checkpoint` as a crash, a full disk or a careless `rm` could; returns its name."""
    if how == "truncated trainer.pt":
        path = checkpoint / "trainer.pt"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "broken state.json":
        path = checkpoint / "state.json"
        path.write_text(path.read_text()[:40])
    else:
        path = checkpoint / "model.safetensors"
        path.unlink()
    return path.name


def all_checkpoints(workdir: Path) -> list[Path]:
    """Every checkpoint folder of a stage (the earlier layout had one: workdir/checkpoint itself)."""
    root = workdir / "checkpoint"
    return sorted(root.glob("step-*"), reverse=True) or ([root] if (root / "state.json").is_file() else [])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """The workdir of train_spec's stage trained without a stop: what every resumption must reproduce."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_training(train_spec(demo_data), workdir)
    return workdir


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one_and_finishes_the_same(
    tmp_path: Path, demo_data: Path, uninterrupted: Path, how: str
) -> None:
    spec = train_spec(demo_data)  # 9 steps, a checkpoint every 4
    with pytest.raises(StagePreempted, match="step 6"):
        run_training(spec, tmp_path, should_stop=stop_after(6, "preempt"))  # checkpoints at steps 4 and 6
    newest = newest_checkpoint(tmp_path)
    assert newest is not None
    name = damage(newest, how)

    resumed, lines = run_training(spec, tmp_path)
    log = "\n".join(lines)
    assert f"checkpoint/step-00000006 cannot be used: {name}" in log, log  # the file, and why
    assert any("falling back" in line and "checkpoint/step-00000004" in line for line in lines), lines
    assert "resumed from step 4" in lines
    assert resumed.resumed_from == 4 and resumed.steps == 9
    assert_bit_identical(saved_weights(uninterrupted), saved_weights(tmp_path))
    assert not (tmp_path / "checkpoint").exists()


def test_with_every_checkpoint_damaged_the_stage_starts_over_and_finishes_the_same(
    tmp_path: Path, demo_data: Path, uninterrupted: Path
) -> None:
    spec = train_spec(demo_data)
    with pytest.raises(StagePreempted, match="step 6"):
        run_training(spec, tmp_path, should_stop=stop_after(6, "preempt"))
    checkpoints = all_checkpoints(tmp_path)
    assert checkpoints
    for checkpoint, how in zip(checkpoints, DAMAGES, strict=False):
        damage(checkpoint, how)

    resumed, lines = run_training(spec, tmp_path)
    assert any("no usable checkpoint" in line for line in lines), lines
    assert resumed.resumed_from is None and resumed.steps == 9
    assert_bit_identical(saved_weights(uninterrupted), saved_weights(tmp_path))


def test_a_stage_stopped_again_before_its_first_step_keeps_the_checkpoint_it_resumed_from(
    tmp_path: Path, demo_data: Path, uninterrupted: Path
) -> None:
    spec = train_spec(demo_data)
    with pytest.raises(StagePreempted, match="step 4"):
        run_training(spec, tmp_path, should_stop=stop_after(4, "preempt"))
    with pytest.raises(StagePreempted, match="step 4"):  # stopped again as soon as it resumed
        run_training(spec, tmp_path, should_stop=stop_after(0, "preempt"))
    # the new checkpoint of step 4 was written beside the one it resumed from, not over it
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-00000004", "step-00000004.2"]
    resumed, lines = run_training(spec, tmp_path)
    assert resumed.resumed_from == 4 and "resumed from step 4" in lines
    assert_bit_identical(saved_weights(uninterrupted), saved_weights(tmp_path))


def test_cancel_raises_without_checkpoint(tmp_path: Path, demo_data: Path) -> None:
    spec = train_spec(demo_data, checkpoint_every=100)
    with pytest.raises(StageCanceled):
        run_training(spec, tmp_path, should_stop=stop_after(2, "cancel"))
    assert not (tmp_path / "checkpoint").exists()
    assert not (tmp_path / "done.json").exists()


def test_out_of_memory_halves_the_micro_batch_and_finishes(tmp_path: Path, demo_data: Path) -> None:
    spec = train_spec(demo_data, batch_size=4, grad_accum=1, checkpoint_every=2, max_steps=6)
    outcome, lines = run_training(spec, tmp_path, oom_at_step=3)
    assert outcome.steps == 6
    assert (outcome.micro_batch, outcome.grad_accum) == (2, 2)
    assert outcome.oom_retries == [
        OomRetry(step=3, micro_batch=4, new_micro_batch=2, new_grad_accum=2, restarted_from=2)
    ]
    assert any("out of GPU memory at step 3" in line for line in lines)
    assert "resumed from step 2" in lines
    assert prefetch_threads() == []  # the failed attempt's thread stopped too
    assert (tmp_path / "model" / "model.safetensors").is_file()
    recorded = json.loads((tmp_path / "done.json").read_text())["train"]["oom_retries"]
    assert recorded == [outcome.oom_retries[0].to_dict()]


@pytest.mark.parametrize("kind", ["compile", "capture"])
def test_an_out_of_memory_inside_compile_or_capture_halves_the_micro_batch(
    tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    from stl.jobs.ml import train as train_module

    original = train_module._TrainingSession._optimizer_step
    raised: list[int] = []

    def failing_once(session: Any, micro_batches: Any) -> Any:
        if session.step + 1 == 3 and not raised:
            raised.append(session.step + 1)
            raise out_of_memory_in_disguise(kind)
        return original(session, micro_batches)

    monkeypatch.setattr(train_module._TrainingSession, "_optimizer_step", failing_once)
    spec = train_spec(demo_data, batch_size=4, grad_accum=1, checkpoint_every=2, max_steps=6)
    outcome, lines = run_training(spec, tmp_path)
    assert raised == [3] and outcome.steps == 6
    assert outcome.oom_retries == [
        OomRetry(step=3, micro_batch=4, new_micro_batch=2, new_grad_accum=2, restarted_from=2)
    ]


def test_only_out_of_memory_counts_as_out_of_memory() -> None:
    import torch

    from stl.jobs.ml.acceleration import caused_by_out_of_memory

    assert caused_by_out_of_memory(torch.OutOfMemoryError("plain"))
    assert caused_by_out_of_memory(out_of_memory_in_disguise("compile"))
    assert caused_by_out_of_memory(out_of_memory_in_disguise("capture"))
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = torch.OutOfMemoryError("inner")
    assert caused_by_out_of_memory(wrapped)
    assert not caused_by_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    try:  # `raise ... from None` while handling an OOM says the OOM is not the cause
        try:
            raise torch.OutOfMemoryError("handled")
        except torch.OutOfMemoryError:
            raise ValueError("unrelated") from None
    except ValueError as e:
        assert not caused_by_out_of_memory(e)
    cycle = ValueError("a")
    cycle.__context__ = KeyError("b")
    cycle.__context__.__context__ = cycle
    assert not caused_by_out_of_memory(cycle)


def test_out_of_memory_at_micro_batch_one_fails_clearly(tmp_path: Path, demo_data: Path) -> None:
    spec = train_spec(demo_data, batch_size=1, grad_accum=1, max_steps=4)
    advice = "even at micro-batch 1.*lower max_source_length or use a smaller model"
    with pytest.raises(OutOfMemory, match=advice) as info:
        run_training(spec, tmp_path, oom_at_step=2)
    assert "CUDA graphs" not in str(info.value)


def test_out_of_memory_under_cuda_graphs_also_names_them(tmp_path: Path, demo_data: Path) -> None:
    spec = train_spec(demo_data, batch_size=1, grad_accum=1, max_steps=4, compile="reduce-overhead")
    with pytest.raises(OutOfMemory, match="drop train.compile: reduce-overhead: its CUDA graphs hold memory"):
        run_training(spec, tmp_path, oom_at_step=2)


def test_reports_schedule_and_reuse_of_a_finished_stage(tmp_path: Path, demo_data: Path) -> None:
    spec = train_spec(demo_data, model="tiny:bart", max_steps=12, warmup_ratio=0.25, checkpoint_every=100)
    reports: list[StepReport] = []
    outcome, _ = run_training(spec, tmp_path, reports=reports)
    assert [r.step for r in reports] == [1, 10, 12]
    assert all(r.total == 12 and r.phase == "train" and r.loss > 0 for r in reports)
    assert all(r.samples_per_s > 0 and r.tokens_per_s > 0 for r in reports)
    assert (reports[-1].micro_batch, reports[-1].grad_accum) == (2, 2)
    assert json.dumps(reports[-1].to_dict())
    assert outcome.final_loss == reports[-1].loss and outcome.resumed_from is None
    again, lines = run_training(spec, tmp_path)
    assert again == outcome and any("already trained" in line for line in lines)


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "stl-batches"]


def test_prefetched_batches_train_bit_identically_to_inline_ones(tmp_path: Path, demo_data: Path) -> None:
    """The background thread changes when batches are made, not which: same reports, same weights."""
    spec = train_spec(demo_data, model="tiny:bart", max_steps=12)
    inline_reports: list[StepReport] = []
    prefetched_reports: list[StepReport] = []
    inline, _ = run_training(spec, tmp_path / "inline", prefetch_batches=0, reports=inline_reports)
    prefetched, _ = run_training(spec, tmp_path / "prefetched", prefetch_batches=3, reports=prefetched_reports)
    assert [(r.step, r.loss) for r in prefetched_reports] == [(r.step, r.loss) for r in inline_reports]
    assert prefetched.final_loss == inline.final_loss
    assert_bit_identical(saved_weights(tmp_path / "inline"), saved_weights(tmp_path / "prefetched"))
    assert prefetch_threads() == []


def test_a_data_error_in_the_prefetch_thread_fails_the_stage_and_stops_the_thread(
    tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stl.jobs.ml.training_batches import TrainingBatches

    encode = TrainingBatches.encode
    made = {"n": 0}

    def encode_then_fail(self: TrainingBatches, batch: Any) -> Any:
        made["n"] += 1
        if made["n"] == 4:
            assert threading.current_thread().name == "stl-batches"  # the batch is made off the step's thread
            raise DataError("row 17 of demo.jsonl has no output")
        return encode(self, batch)

    monkeypatch.setattr(TrainingBatches, "encode", encode_then_fail)
    reports: list[StepReport] = []
    with pytest.raises(DataError, match="row 17"):
        run_training(train_spec(demo_data, checkpoint_every=100), tmp_path, reports=reports)
    assert [r.step for r in reports] == [1]  # the three batches made before the error were trained on
    assert prefetch_threads() == []


def test_only_stages_that_tokenize_per_batch_make_batches_on_the_prefetch_thread(
    tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MTL stages tokenize every batch: that goes to the thread. A few-shot stage's examples are tokenized once,
    up front, so its batches (padding only) are made on the step's own thread."""
    from stl.jobs.ml.training_batches import TrainingBatches

    encode = TrainingBatches.encode
    threads: dict[str, set[str]] = {}

    def encode_and_record(self: TrainingBatches, batch: Any) -> Any:
        threads.setdefault(self.spec.kind.value, set()).add(threading.current_thread().name)
        return encode(self, batch)

    monkeypatch.setattr(TrainingBatches, "encode", encode_and_record)
    run_training(train_spec(demo_data, max_steps=3), tmp_path / "mtl")
    run_training(train_spec(demo_data, kind="finetune", max_steps=3), tmp_path / "finetune")
    assert threads == {"mtl": {"stl-batches"}, "finetune": {threading.current_thread().name}}


def test_cancel_stops_the_prefetch_thread(tmp_path: Path, demo_data: Path) -> None:
    with pytest.raises(StageCanceled):
        run_training(train_spec(demo_data, checkpoint_every=100), tmp_path, should_stop=stop_after(2, "cancel"))
    assert prefetch_threads() == []


def test_learning_rate_warms_up_then_decays_linearly() -> None:
    factor = _warmup_then_linear_decay(max_steps=10, warmup_ratio=0.3)
    values = [factor(step) for step in range(10)]
    assert values[:3] == [0.25, 0.5, 0.75]
    assert values[3] == 1.0
    assert all(a > b for a, b in zip(values[3:], values[4:], strict=False))
    assert values[-1] > 0


def test_stage_chain_mtl_then_finetune_then_eval(tmp_path: Path, demo_data: Path) -> None:
    mtl = train_spec(demo_data, model="tiny:bart", max_steps=4)
    finetune = train_spec(demo_data, model="tiny:bart", kind="finetune", max_steps=3)
    evaluation = StageSpec(
        kind=StageKind.eval,
        model="tiny:bart",
        data=str(demo_data),
        tasks=DEMO_EVAL_TASKS,
        eval=EvalConfig(max_examples=3, batch_size=4, max_new_tokens=6, samples=1),
    )
    reports: list[StepReport] = []
    lines: list[str] = []

    def context(name: str, parent: str | None) -> StageContext:
        return StageContext(
            workdir=tmp_path / name,
            parent_dir=None if parent is None else tmp_path / parent,
            device="cpu",
            on_step=reports.append,
            should_stop=lambda: None,
            log=lines.append,
            cache_dir=tmp_path / "cache",
        )

    first = execute_stage(mtl, context("mtl", None))
    assert first.train is not None and first.train.steps == 4 and first.metrics == []
    second = execute_stage(finetune, context("finetune", "mtl"))
    assert second.train is not None and second.train.steps == 3
    third = execute_stage(evaluation, context("eval", "finetune"))
    assert [m.task for m in third.metrics] == list(DEMO_EVAL_TASKS)
    assert third.train is None
    outcome = json.loads(json.dumps(third.to_dict()))
    assert outcome["metrics"][0]["n"] == 3
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == outcome["metrics"]
    assert any(r.phase == "eval" for r in reports)
    # A finished eval stage is not run again.
    assert execute_stage(evaluation, context("eval", "finetune")).metrics == third.metrics
    with pytest.raises(ModelError, match="not in .*missing-parent.* shared STL_HOME"):
        execute_stage(evaluation, context("eval-orphan", "missing-parent"))


def test_a_micro_batch_shape_is_new_once_whatever_its_values() -> None:
    # Under CUDA graphs the allocator's cache is emptied before a shape's first graph records, and only then.
    shapes = ShapesSeen()
    batch = {"input_ids": torch.zeros(4, 64, dtype=torch.long), "labels": torch.zeros(4, 32, dtype=torch.long)}
    assert shapes.first_sight(batch)
    assert not shapes.first_sight({name: tensor + 1 for name, tensor in reversed(batch.items())})
    assert shapes.first_sight({**batch, "labels": torch.zeros(4, 64, dtype=torch.long)})  # a new target bucket
    assert shapes.first_sight({name: tensor[:2] for name, tensor in batch.items()})  # the smaller last micro-batch
