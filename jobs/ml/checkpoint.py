"""A training stage's checkpoints: written whole or not at all, the previous one kept, a damaged one skipped.

Layout, under the stage's workdir:
    checkpoint/step-00000008/   the newest checkpoint
        model.safetensors       model weights
        trainer.pt              optimizer + scheduler state, torch (and CUDA) RNG states (torch.save, weights only)
        state.json              step, micro-batch plan, data position, OOM history, python/numpy RNG states
    checkpoint/step-00000004/   the one before: where training resumes if the newest is damaged
    checkpoint/.step-00000012.tmp/  a checkpoint being written (removed if the write fails)

A checkpoint is written into its .tmp folder, every file and the folder fsync'd, then renamed into place,
so a crash or a power cut leaves complete checkpoints only. Before a new one is written, all but the
newest are removed, so a disk holds at most two and a half-written one. Loading tries the newest first and
falls back to the one before (or to step 0) when a file of it is missing or damaged, logging which file
and why. Folders of the earlier layout (checkpoint/ holding the files itself, checkpoint.old/) are read too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stl.jobs.durable import MIN_NEED_BYTES, fsync_directory, fsync_tree, remove, saving
from stl.jobs.health import machine_fault
from stl.jobs.layout import CHECKPOINT_DIR

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import torch

STATE_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"step-(\d+)(?:\.(\d+))?")  # step-00000008, or step-00000008.2: written again at that step
_STATE_KEYS = ("step", "batch_size", "micro_batch", "grad_accum", "data", "oom_retries", "elapsed_s",
               "python_rng", "numpy_rng")
_TRAINER_KEYS = ("optimizer", "scheduler", "torch_rng", "cuda_rng")


class CheckpointDamaged(Exception):
    """A file of a checkpoint is missing or cannot be read; the message names it."""


class CheckpointForeign(Exception):
    """A checkpoint written by another stage or stl version."""


@dataclass(frozen=True)
class Checkpoint:
    directory: Path
    state: dict[str, Any]  # state.json
    trainer: dict[str, Any]  # trainer.pt, on the training device

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def weights(self) -> Path:
        return self.directory / WEIGHTS_FILE


class CheckpointStore:
    """The checkpoints of one training stage (see the module's docstring)."""

    def __init__(self, workdir: Path, stage_id: str, log: Callable[[str], None], *,
                 fence: Callable[[], None] = lambda: None) -> None:
        self.workdir, self.stage_id, self.log = workdir, stage_id, log
        # Raises once another work horse took the stage over (queue/fence.py): checked before this horse deletes or
        # commits a checkpoint, so a horse that wakes up past its lease never touches the newer horse's.
        self.fence = fence
        self.root = workdir / CHECKPOINT_DIR
        # The newest complete checkpoint (loaded, or written since) and its step. Only its folder: holding its
        # tensors would keep a dropped optimizer's memory alive through an out-of-memory retry.
        self.kept: tuple[Path, int] | None = None

    # --- reading ---

    def load(self, device: str) -> Checkpoint | None:
        """The newest checkpoint that reads whole (its trainer state on `device`), or None: start at step 0.
        Each one skipped is logged with the file and the reason, and so is where training starts instead."""
        skipped = False
        for directory in self._candidates():
            try:
                checkpoint = _read(directory, self.stage_id, device)
            except CheckpointForeign as e:
                self.log(f"ignoring checkpoint {self._name(directory)}: {e}")
                remove(directory)
                continue
            except CheckpointDamaged as e:
                self.log(f"checkpoint {self._name(directory)} cannot be used: {e}")
                skipped = True
                continue
            if skipped:
                self.log(f"falling back to the previous checkpoint, {self._name(directory)} (step {checkpoint.step})")
            self.kept = (directory, checkpoint.step)
            return checkpoint
        if skipped:
            self.log("no usable checkpoint is left: training starts again from step 0")
        self.kept = None
        return None

    def _candidates(self) -> list[Path]:
        """Checkpoint folders, newest first: step folders by step, then the earlier layout's."""
        steps = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                match = _STEP_DIR.fullmatch(entry.name)
                if match and entry.is_dir():
                    steps.append(((int(match.group(1)), int(match.group(2) or 1)), entry))
        legacy = [path for path in (self.root, self.workdir / f"{CHECKPOINT_DIR}.old")
                  if (path / STATE_FILE).is_file()]
        return [path for _, path in sorted(steps, reverse=True)] + legacy

    def _name(self, directory: Path) -> str:
        return str(directory.relative_to(self.workdir)) if directory.is_relative_to(self.workdir) else str(directory)

    # --- writing ---

    def save(self, step: int, model: torch.nn.Module, trainer: dict[str, Any], state: dict[str, Any]) -> None:
        """Write the checkpoint of `step`. Only the newest complete checkpoint is kept beside it while it is
        written (so a disk holds at most two), and it becomes the newest only once all of it is on disk."""
        import torch
        from safetensors.torch import save_model as save_weights

        self.fence()
        self._drop_all_but(self.kept)
        final, version = self.root / f"step-{step:08d}", 1
        while final.exists():  # the kept one is of this step too (a stop right after resuming): it stays too
            version += 1
            final = self.root / f"step-{step:08d}.{version}"
        temporary = self.root / f".{final.name}.tmp"
        needed = _tensor_bytes(model.state_dict()) + _tensor_bytes(trainer) + MIN_NEED_BYTES
        with saving(final, temporary, needed=needed):
            temporary.mkdir(parents=True)
            save_weights(model, str(temporary / WEIGHTS_FILE))
            torch.save(trainer, temporary / TRAINER_FILE)
            (temporary / STATE_FILE).write_text(json.dumps(state))
            fsync_tree(temporary)
            self.fence()
            os.replace(temporary, final)  # the commit: from here on this is the newest checkpoint
            fsync_directory(self.root)
        self.kept = (final, step)

    def _drop_all_but(self, keep: tuple[Path, int] | None) -> None:
        """Remove every checkpoint but `keep`: older ones, damaged ones, and any half-written one."""
        kept = None if keep is None else keep[0]
        if self.root.is_dir():
            for entry in self.root.iterdir():
                in_kept_legacy_root = kept == self.root and entry.is_file()
                if entry != kept and not in_kept_legacy_root:
                    remove(entry)
        old = self.workdir / f"{CHECKPOINT_DIR}.old"
        if kept != old:
            remove(old)

    def remove_all(self) -> None:
        """The stage finished: its checkpoints are redundant."""
        remove(self.root)
        remove(self.workdir / f"{CHECKPOINT_DIR}.old")
        self.kept = None


def _read(directory: Path, stage_id: str, device: str) -> Checkpoint:
    state = _read_state(directory / STATE_FILE)
    if state.get("format") != STATE_FORMAT or state.get("stage_id") != stage_id:
        raise CheckpointForeign("written by another stage or stl version")
    _check_weights(directory / WEIGHTS_FILE)
    trainer = _read_trainer(directory / TRAINER_FILE, device)
    return Checkpoint(directory, state, trainer)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointDamaged(f"{path.name} is missing") from e
    except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 errors
        _unless_the_machine_is_to_blame(e)
        raise CheckpointDamaged(f"{path.name} cannot be read: {_one_line(e)}") from e
    if not isinstance(state, dict):
        raise CheckpointDamaged(f"{path.name} is not a JSON object")
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise CheckpointDamaged(f"{path.name} lacks {', '.join(missing)}")
    return state


def _check_weights(path: Path) -> None:
    """safetensors checks the header and that the file is as long as it says: a truncated file fails here."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointDamaged(f"{path.name} is missing")
    try:
        with safe_open(str(path), framework="pt") as weights:
            if not list(weights.keys()):
                raise CheckpointDamaged(f"{path.name} holds no tensors")
    except (OSError, SafetensorError) as e:
        _unless_the_machine_is_to_blame(e)
        raise CheckpointDamaged(f"{path.name} cannot be read: {_one_line(e)}") from e


def _read_trainer(path: Path, device: str) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise CheckpointDamaged(f"{path.name} is missing")
    try:
        trainer = torch.load(path, map_location=device, weights_only=True)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # torch raises RuntimeError, EOFError, pickle errors... for a torn file
        _unless_the_machine_is_to_blame(e)
        raise CheckpointDamaged(f"{path.name} cannot be read: {_one_line(e)}") from e
    if not isinstance(trainer, dict) or any(key not in trainer for key in _TRAINER_KEYS):
        raise CheckpointDamaged(f"{path.name} lacks the optimizer, scheduler or RNG state")
    return trainer


def _unless_the_machine_is_to_blame(error: Exception) -> None:
    """Raise `error` again where the machine is to blame (an I/O error): that is no damage of the checkpoint,
    and must not make the stage fall back (stl.jobs.health requeues it and pauses the worker instead)."""
    if machine_fault(error) is not None:
        raise error


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in `value` (nested dicts, lists and tuples): about what saving it writes."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def _one_line(error: BaseException) -> str:
    detail = " ".join(str(error).split())
    return (detail[:200] + "…") if len(detail) > 200 else detail or type(error).__name__
