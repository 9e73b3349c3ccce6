"""A real full disk, and a real read-only one: a small tmpfs under STL_HOME, not an injected OSError.

A full disk makes torch's serializer fail without an errno ("unexpected pos", "iostream error"): the save is
recognised by the disk's free space, its files aside are removed, the stage goes back to the head of its
queue and the worker pauses until the disk has room for what the stage failed to write, then goes on by
itself. Mounting needs root (CI runs the tests as root); elsewhere these tests skip, saying why.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import time
from typing import TYPE_CHECKING, Any

import pytest

from stl.jobs import keys
from stl.jobs.codec import text
from tests.helpers import (
    child_env,
    enqueue,
    grid_done,
    newest_checkpoint,
    run_statuses,
    small_grid,
    stage_log,
    status_json,
    stl,
    wait_for,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import redis
    import torch

    from tests.helpers import Workers

# A tiny:bart checkpoint (weights and AdamW state) takes about 6.4 MB: one fits in 10 MB, two do not.
ONE_CHECKPOINT_FITS = "10m"
ROOMY = "64m"


class Tmpfs:
    """A tmpfs this test mounted; remounted (resized, read-only) as the test goes; always unmounted."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (CI runs the tests as root)")
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                                 capture_output=True, text=True, check=False)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True, capture_output=True)

    def unmount(self) -> None:
        if subprocess.run(["umount", str(self.path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)  # still busy


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Tmpfs]:
    disk = Tmpfs(path, size)
    try:
        yield disk
    finally:
        disk.unmount()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Tmpfs]:
    with tmpfs(tmp_path / "small-disk", ONE_CHECKPOINT_FITS) as disk:
        yield disk



@contextlib.contextmanager
def home_on_tmpfs(home: Path, size: str, workers: Workers) -> Iterator[Tmpfs]:
    """STL_HOME on a tmpfs of `size`; the workers are stopped before it is unmounted."""
    with tmpfs(home, size) as disk:
        try:
            yield disk
        finally:
            workers.stop_all()


def leftovers(home: Path) -> list[str]:
    """Files and folders written aside by a save that did not complete."""
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.name.endswith((".tmp", ".old")))


def trained_bart() -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """tiny:bart after one AdamW step: a model, its tokenizer, and a trainer state as a stage checkpoints it."""
    import torch

    from stl.jobs.ml.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny:bart", device="cpu", seed=0, init_from=None)
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.ones(1, 4, dtype=torch.long)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    trainer = {"optimizer": optimizer.state_dict(), "scheduler": {}, "torch_rng": torch.get_rng_state(),
               "cuda_rng": []}
    return model, tokenizer, trainer


def state_at(step: int) -> dict[str, Any]:
    return {"format": 1, "stage_id": "s", "step": step, "batch_size": 4, "micro_batch": 4, "grad_accum": 1,
            "data": {"next_batch": step, "window_batches": 1}, "oom_retries": [], "elapsed_s": 0.0,
            "python_rng": [], "numpy_rng": []}


def test_a_save_that_fills_a_real_disk_is_a_full_disk_and_keeps_the_previous_checkpoint(
        small_disk: Tmpfs, tmp_path: Path) -> None:
    from stl.jobs.durable import DiskFull, disk_write_fault, needed_bytes
    from stl.jobs.health import machine_fault
    from stl.jobs.ml.checkpoint import CheckpointStore
    from stl.jobs.ml.models import save_model

    model, tokenizer, trainer = trained_bart()
    lines: list[str] = []
    store = CheckpointStore(small_disk.path / "stage", "s", lines.append)
    store.save(2, model, trainer, state_at(2))
    free = shutil.disk_usage(small_disk.path).free
    with pytest.raises(DiskFull) as full:
        store.save(4, model, trainer, state_at(4))  # two checkpoints do not fit: torch says "unexpected pos"
    assert full.value.errno == errno.ENOSPC
    assert machine_fault(full.value), "the stage goes back to its queue and its worker pauses"
    assert needed_bytes(full.value) > 6_000_000  # the worker waits for this much room
    assert leftovers(small_disk.path) == []
    # and its space is free again: no file deleted while torch's writer still held it open
    assert shutil.disk_usage(small_disk.path).free == free
    # the previous checkpoint is whole, and is the one a retry resumes from
    resumed = CheckpointStore(small_disk.path / "stage", "s", lines.append).load("cpu")
    assert resumed is not None and resumed.step == 2, lines
    # nor does the final model once the disk is fuller still: nothing half-written is left
    (small_disk.path / "ballast").write_bytes(b"x" * (shutil.disk_usage(small_disk.path).free - (1 << 20)))
    with pytest.raises(DiskFull):
        save_model(model, tokenizer, small_disk.path / "stage" / "model")
    assert leftovers(small_disk.path) == [] and not (small_disk.path / "stage" / "model").exists()
    # the same words from torch, on a disk with room, are the stage's own error
    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 217664 vs 217556")
    assert disk_write_fault(torn, tmp_path, needed=1000) is None
    assert disk_write_fault(torn, small_disk.path, needed=10_000_000) is not None
    # a read-only disk is the machine's fault too
    small_disk.remount("ro")
    with pytest.raises(OSError, match="Read-only file system") as read_only:
        store.save(6, model, trainer, state_at(6))
    assert machine_fault(read_only.value)


def paused_worker(env: dict[str, str] | None = None) -> dict[str, Any] | None:
    return next((w for w in status_json(env)["workers"] if w["state"] == "paused"), None)


@pytest.mark.slow
def test_a_real_full_disk_pauses_the_worker_and_the_same_run_finishes_once_there_is_room(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, workers: Workers) -> None:
    with home_on_tmpfs(stl_env, ONE_CHECKPOINT_FITS, workers) as disk:
        enqueue(small_grid(tmp_path, demo_data, "fills-the-disk"))  # a checkpoint every 2 steps, 6 steps
        worker = workers.start()
        wait_for(lambda: paused_worker() or grid_done(conn, "fills-the-disk"), timeout=180, interval=0.5,
                 what="the worker to pause", diagnostics=workers.logs)
        statuses = run_statuses(conn, "fills-the-disk")
        assert set(statuses.values()) == {"queued"}, (statuses, workers.logs())
        paused = paused_worker()
        assert paused is not None and "MiB free on the disk under STL_HOME" in paused["paused"], paused
        (run_id,) = statuses
        train_stage = next(s for s in json.loads(text(conn.hget(keys.run(run_id), "stages")))
                           if text(conn.hget(keys.stage(s), "kind")) == "finetune")
        assert text(conn.hget(keys.stage(train_stage), "status")) == "queued"
        assert text(conn.hget(keys.stage(train_stage), "machine_faults")) == "1"
        assert "stopped by a fault of this machine" in "\n".join(stage_log(conn, train_stage))
        assert leftovers(stl_env) == [], "a failed save leaves nothing aside"
        kept = newest_checkpoint(stl_env / "stages" / train_stage)
        assert kept is not None and json.loads((kept / "state.json").read_text())["step"] == 2
        status = stl("status", "--once", env=child_env(COLUMNS="250"))
        assert "takes no work: only" in status.stdout, status.stdout
        time.sleep(2)  # a worker that ignored its pause would take the stage again now
        assert set(run_statuses(conn, "fills-the-disk").values()) == {"queued"}

        disk.remount(f"size={ROOMY}")  # room again: the worker's next health check (every 30 s) lets it go on
        wait_for(lambda: grid_done(conn, "fills-the-disk"), timeout=150, interval=0.5, what="the run to finish",
                 diagnostics=workers.logs)
        assert set(run_statuses(conn, "fills-the-disk").values()) == {"finished"}, workers.logs()
        assert "resumed from step 2" in "\n".join(stage_log(conn, train_stage))
        assert worker.alive() and paused_worker() is None
        assert leftovers(stl_env) == []
        worker.kill()


@pytest.mark.slow
def test_a_worker_paused_by_a_read_only_disk_goes_on_by_itself_once_it_is_writable(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, workers: Workers) -> None:
    with home_on_tmpfs(stl_env, ROOMY, workers) as disk:
        worker = workers.start()
        wait_for(lambda: any(w["state"] == "idle" for w in status_json()["workers"]), timeout=120, interval=0.5,
                 what="the worker to start", diagnostics=workers.logs)
        disk.remount("ro")
        enqueue(small_grid(tmp_path, demo_data, "read-only", shots=[0]))
        paused = wait_for(paused_worker, timeout=120, interval=0.5, what="the worker to pause",
                          diagnostics=workers.logs)
        assert "Read-only file system" in paused["paused"], paused
        assert set(run_statuses(conn, "read-only").values()) == {"queued"}, workers.logs()

        disk.remount("rw")
        wait_for(lambda: grid_done(conn, "read-only"), timeout=150, interval=0.5, what="the run to finish",
                 diagnostics=workers.logs)
        assert set(run_statuses(conn, "read-only").values()) == {"finished"}, workers.logs()
        assert worker.alive() and paused_worker() is None
        worker.kill()
