"""Builders and helpers shared by tests: small grids and training runs, real worker subprocesses, the CLI as a
subprocess, and polling. The `workers` fixture (a pool of `Worker`s) is in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from stl.jobs import keys
from stl.jobs.codec import text

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import redis
    import torch

    from stl.jobs.ml.progress import StepReport
    from stl.jobs.ml.train import TrainOutcome
    from stl.jobs.specs import StageSpec


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
    """`stl.jobs.ml.train.train` on the CPU; returns the outcome and the stage's log lines."""
    from stl.jobs.ml.train import TrainRun, train

    lines: list[str] = []
    run = TrainRun(spec=spec, workdir=workdir, init_from=init_from, device="cpu", should_stop=should_stop,
                   log=lines.append, oom_at_step=oom_at_step, cache_dir=cache_dir, prefetch_batches=prefetch_batches)
    outcome = train(run, on_step=(reports.append if reports is not None else lambda report: None))
    return outcome, lines


def newest_checkpoint(workdir: Path) -> Path | None:
    """The folder of a training stage's newest checkpoint (see stl.jobs.ml.checkpoint), or None; also of the earlier
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


REPO = Path(__file__).resolve().parents[1]

# One small training grid: a stage takes a few seconds on a CPU.
TRAIN = {"max_steps": 6, "batch_size": 4, "learning_rate": 1.0e-3, "max_source_length": 64,
         "max_target_length": 8, "checkpoint_every": 2}
EVAL = {"max_examples": 4, "batch_size": 4, "max_new_tokens": 4, "max_source_length": 64}
TASKS = {"train": ["sentiment_classification"], "eval": ["emotion_classification"]}


def small_grid(directory: Path, data: Path, name: str, *, filename: str | None = None,
               models: list[str] | None = None, mtl: list[str] | None = None, shots: list[int] | None = None,
               seeds: list[int] | None = None, train: dict[str, Any] | None = None, **top: Any) -> Path:
    axes = {"model": models or ["tiny:bart"], "mtl": mtl or ["none"], "instructions": [True],
            "shots": shots if shots is not None else [4], "seed": seeds or [0]}
    return write_grid(directory, data, filename or f"{name}.yaml", name=name, tasks=TASKS, grid=axes,
                      train={**TRAIN, **(train or {})}, eval=EVAL, **top)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of an stl subprocess: this test's STL_* settings, plus `extra`."""
    # One intra-op thread per process: several horses and workers share two cores, and torch's default
    # (a thread per core in every process) makes them thrash, a step taking ten times as long.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1", **extra}
    env.pop("STL_FAULT_INJECT", None)
    if "STL_FAULT_INJECT" in extra:
        env["STL_FAULT_INJECT"] = extra["STL_FAULT_INJECT"]
    return env


def stl(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stl.cli.main", *args], capture_output=True, text=True, cwd=REPO,
                          env=env or child_env(), timeout=timeout, check=False)


@dataclass
class Worker:
    """An `stl worker` subprocess in its own session. Its work horse puts itself in a group of its own
    (RQ calls setpgrp), so killing "the worker and its horse" means both groups."""

    log: Path
    env: dict[str, str]
    burst: bool = False
    extra_args: list[str] = field(default_factory=list)  # more options of `stl worker`
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Worker:
        args = [sys.executable, "-m", "stl.cli.main", "worker", *(["--burst"] if self.burst else []), *self.extra_args]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(args, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL to the worker's process group (not its horse: see kill_horse)."""
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def kill_horse(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # the horse leads its own process group


def parent_pid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Workers:
    """Every worker a test starts, killed at the end whatever happens; their logs shown on failure."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Worker] = []

    def start(self, *, burst: bool = False, env: dict[str, str] | None = None,
              extra_args: list[str] | None = None) -> Worker:
        log = self.directory / f"worker-{len(self.started)}.log"
        worker = Worker(log=log, env=env or child_env(), burst=burst, extra_args=extra_args or []).start()
        self.started.append(worker)
        return worker

    def logs(self) -> str:
        return "\n".join(f"--- {w.log.name} (pid {w.pid})\n{w.output()[-4000:]}" for w in self.started)

    def stop_all(self) -> None:
        for worker in self.started:
            worker.kill()


def worker_pool(directory: Path) -> Iterator[Workers]:
    """For a `workers` fixture: every worker started through it is killed when the test ends."""
    pool = Workers(directory)
    try:
        yield pool
    finally:
        pool.stop_all()


def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1,
             diagnostics: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{diagnostics()}" if diagnostics else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)


def run_statuses(conn: redis.Redis, grid: str) -> dict[str, str]:
    ids = [text(r) for r in conn.zrange(keys.grid_runs(grid), 0, -1)]
    pipe = conn.pipeline(transaction=False)
    for run_id in ids:
        pipe.hget(keys.run(run_id), "status")
    return {run_id: text(s) for run_id, s in zip(ids, pipe.execute(), strict=True)}


def grid_done(conn: redis.Redis, grid: str) -> bool:
    statuses = run_statuses(conn, grid)
    return bool(statuses) and all(s in ("finished", "failed", "canceled") for s in statuses.values())


def status_json(env: dict[str, str] | None = None) -> dict[str, Any]:
    result = stl("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return dict(json.loads(result.stdout))


def runs_by_model(payload: dict[str, Any], grid: str) -> dict[str, dict[str, Any]]:
    return {run["cell"]["model"]: run for run in payload["runs"] if run["grid"] == grid}


def stage_log(conn: redis.Redis, stage_id: str) -> list[str]:
    return [text(line) for line in conn.lrange(keys.stage_log(stage_id), 0, -1)]


def enqueue(path: Path, env: dict[str, str] | None = None) -> None:
    result = stl("enqueue", str(path), env=env)
    assert result.returncode == 0, result.stderr
