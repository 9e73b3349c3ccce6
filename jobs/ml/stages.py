"""The one seam between the worker and the ML code: run a stage, get its outcome. No Redis here.

Imports stay light (no torch at module level) so the worker can import this before deciding to fork;
`preload_libraries()` pays the heavy imports once in a forking parent without touching CUDA.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stl.jobs.durable import write_atomically
from stl.jobs.errors import ParentModelMissing
from stl.jobs.layout import DONE_FILE, METRICS_FILE, MODEL_DIR, PRUNED_FILE
from stl.jobs.ml.evaluate import EvalRun, TaskMetrics, evaluate
from stl.jobs.ml.models import STL_MODEL_FILE
from stl.jobs.ml.train import TrainOutcome, TrainRun, train
from stl.jobs.settings import load_settings
from stl.jobs.specs import StageKind

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from stl.jobs.ml.progress import StepReport
    from stl.jobs.specs import StageSpec


@dataclass
class StageContext:
    workdir: Path  # this stage's own directory (checkpoints, model, metrics)
    parent_dir: Path | None  # the parent stage's workdir (its model is parent_dir/"model"); None: base model
    device: str
    on_step: Callable[[StepReport], None]
    should_stop: Callable[[], str | None]  # None, "cancel" or "preempt"; called often, so keep it cheap
    log: Callable[[str], None]
    oom_at_step: int | None = None  # test-only fault injection, see TrainRun.oom_at_step
    # Compile caches, token ids and row indexes shared by stages; None: STL_HOME/cache from the settings.
    cache_dir: Path | None = None
    # Raises StageLeaseLost once another work horse took the stage over (stl.jobs.queue.fence); called right before a
    # checkpoint, model or metrics file is committed, so a stale horse never replaces a newer one's.
    fence: Callable[[], None] = lambda: None


@dataclass
class StageOutcome:
    metrics: list[TaskMetrics] = field(default_factory=list)  # eval stages only
    train: TrainOutcome | None = None  # mtl / finetune stages only

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": [metric.to_dict() for metric in self.metrics],
            "train": None if self.train is None else self.train.to_dict(),
        }


def execute_stage(spec: StageSpec, ctx: StageContext) -> StageOutcome:
    """Run one stage in `ctx.workdir`. A finished stage (done.json present) is not run again.

    Escaping exceptions: StageCanceled, StagePreempted (training checkpointed first), OutOfMemory,
    DataError (missing/malformed data, unknown task), ModelError (model cannot be built or loaded; its
    ParentModelMissing: the parent's model is not in STL_HOME, checked first); anything else is a bug.
    """
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    parent_model = _parent_model_dir(ctx.parent_dir)
    cache_dir = ctx.cache_dir or load_settings().cache_dir
    if spec.kind == StageKind.eval:
        done = ctx.workdir / DONE_FILE
        if done.is_file():
            saved = json.loads(done.read_text())
            ctx.log(f"stage {spec.stage_id} already evaluated; reusing its metrics")
            return StageOutcome(metrics=[TaskMetrics.from_dict(m) for m in saved["metrics"]])
        metrics = evaluate(
            EvalRun(
                spec=spec,
                model_dir=parent_model,
                device=ctx.device,
                should_stop=ctx.should_stop,
                log=ctx.log,
                cache_dir=cache_dir,
            ),
            on_step=ctx.on_step,
        )
        outcome = StageOutcome(metrics=metrics)
        _write_json(ctx.workdir / METRICS_FILE, outcome.to_dict()["metrics"], before_commit=ctx.fence)
        _write_json(done, {"stage_id": spec.stage_id, "metrics": outcome.to_dict()["metrics"]},
                    before_commit=ctx.fence)
        return outcome
    pruned = ctx.workdir / PRUNED_FILE
    if pruned.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(json.loads(pruned.read_text())["pruned_at"]))
            ctx.log(f"training again: `stl disk --prune` deleted this stage's model on {when}, and a new stage "
                    "starts from it")
    run = TrainRun(
        spec=spec,
        workdir=ctx.workdir,
        init_from=parent_model,
        device=ctx.device,
        should_stop=ctx.should_stop,
        log=ctx.log,
        oom_at_step=ctx.oom_at_step,
        cache_dir=cache_dir,
        fence=ctx.fence,
    )
    outcome = StageOutcome(train=train(run, on_step=ctx.on_step))
    (ctx.workdir / PRUNED_FILE).unlink(missing_ok=True)  # trained again after `stl disk --prune`
    return outcome


def _parent_model_dir(parent_dir: Path | None) -> Path | None:
    if parent_dir is None:
        return None
    for candidate in (parent_dir / MODEL_DIR, parent_dir):
        if (candidate / STL_MODEL_FILE).is_file():
            return candidate
    # The queue runs a stage only after its parent finished, so the model is missing from *this* STL_HOME.
    why = "its model was deleted since, or it was trained in another STL_HOME"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        when = json.loads((parent_dir / PRUNED_FILE).read_text())["pruned_at"]
        why = f"`stl disk --prune` deleted its model on {time.strftime('%Y-%m-%d %H:%M', time.localtime(when))}"
    raise ParentModelMissing(
        f"the parent stage's model is not in {parent_dir}: the parent finished, but {why}; workers on several "
        "machines need one shared STL_HOME (NFS, say)", parent_dir=parent_dir, why=why)


def _write_json(path: Path, value: Any, *, before_commit: Callable[[], None]) -> None:
    write_atomically(path, json.dumps(value, indent=2) + "\n", before_commit=before_commit)


def preload_libraries() -> None:
    """Import torch, transformers, datasets and the model code once, e.g. in a forking worker's parent.

    Only imports: no device queries, so no CUDA context exists before the fork.
    """
    import datasets  # noqa: F401
    import numpy  # noqa: F401
    import rouge_score.rouge_scorer  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import torch.nn.functional  # noqa: F401
    import transformers  # noqa: F401
    from transformers import (  # noqa: F401  (resolves transformers' lazy modules now, not per job)
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        BartForConditionalGeneration,
        ByT5Tokenizer,
        GPT2LMHeadModel,
        T5ForConditionalGeneration,
    )

    quiet_library_progress_bars()


def quiet_library_progress_bars() -> None:
    """The worker's log is stl's own progress: per-file bars from loading and saving weights are noise."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def pick_device() -> str:
    """Return "cuda" when a GPU is usable, else "cpu". Call it in the process that will do the work."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
