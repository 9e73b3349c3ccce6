"""Small builders shared by tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import torch

    from jobs.progress import StepReport
    from jobs.specs import StageSpec
    from jobs.train import TrainOutcome


def grid_dict(data: Path, **overrides: Any) -> dict[str, Any]:
    """A tiny, fast grid on the demo dataset; keyword arguments replace top-level keys."""
    grid: dict[str, Any] = {
        "name": "test-grid",
        "data": str(data),
        "tasks": {"train": ["sentiment_classification", "response_generation"],
                  "eval": ["emotion_classification", "summarization"]},
        "grid": {"model": ["tiny:bart"], "mtl": ["none", "in-domain"], "instructions": [True],
                 "shots": [0, 4], "seed": [0]},
        "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 1.0e-3, "max_source_length": 96,
                  "max_target_length": 16, "checkpoint_every": 2},
        "eval": {"max_examples": 6, "batch_size": 6, "max_new_tokens": 8, "max_source_length": 96},
    }
    grid.update(overrides)
    return grid


def write_grid(directory: Path, data: Path, filename: str = "grid.yaml", **overrides: Any) -> Path:
    path = directory / filename
    path.write_text(yaml.safe_dump(grid_dict(data, **overrides), sort_keys=False))
    return path


def run_training(
    spec: StageSpec,
    workdir: Path,
    *,
    should_stop: Callable[[], str | None] = lambda: None,
    init_from: Path | None = None,
    oom_at_step: int | None = None,
    cache_dir: Path | None = None,
    reports: list[StepReport] | None = None,
    prefetch_batches: int = 2,
) -> tuple[TrainOutcome, list[str]]:
    """`jobs.train.train` on the CPU; returns the outcome and the stage's log lines."""
    from jobs.train import TrainRun, train

    lines: list[str] = []
    run = TrainRun(spec=spec, workdir=workdir, init_from=init_from, device="cpu", should_stop=should_stop,
                   log=lines.append, oom_at_step=oom_at_step, cache_dir=cache_dir, prefetch_batches=prefetch_batches)
    outcome = train(run, on_step=(reports.append if reports is not None else lambda report: None))
    return outcome, lines


def newest_checkpoint(workdir: Path) -> Path | None:
    """The folder of a training stage's newest checkpoint (see jobs.checkpoint), or None; also of the earlier
    layout, where workdir/checkpoint held the files itself."""
    import re

    root = workdir / "checkpoint"
    steps = []
    for entry in (root.iterdir() if root.is_dir() else []):
        match = re.fullmatch(r"step-(\d+)(?:\.(\d+))?", entry.name)
        if match and (entry / "state.json").is_file():
            steps.append(((int(match.group(1)), int(match.group(2) or 1)), entry))
    if steps:
        return max(steps)[1]
    return root if (root / "state.json").is_file() else None


def saved_weights(workdir: Path) -> dict[str, torch.Tensor]:
    """The final model a training stage saved in `workdir`."""
    from safetensors import torch as safetensors_torch

    return safetensors_torch.load_file(str(workdir / "model" / "model.safetensors"))


def assert_bit_identical(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    import torch

    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def out_of_memory_in_disguise(kind: str) -> Exception:
    """Errors that mean the GPU ran out of memory without being torch.OutOfMemoryError themselves."""
    import torch
    from torch._dynamo.exc import BackendCompilerFailed

    if kind == "compile":  # what torch.compile raises when its backend ran out of memory compiling
        return BackendCompilerFailed(lambda: None, torch.OutOfMemoryError("compiling"), None)
    try:  # a CUDA graph's capture abandoned after an OOM inside it
        raise torch.OutOfMemoryError("recording")
    except torch.OutOfMemoryError:
        try:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        except RuntimeError as e:
            return e
