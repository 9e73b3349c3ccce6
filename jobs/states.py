"""States and kinds, as str enums. Light to import: no pydantic here."""

from __future__ import annotations

from enum import Enum


class RunStatus(str, Enum):
    queued = "queued"
    running = "running"
    finished = "finished"
    failed = "failed"
    canceled = "canceled"

    @property
    def is_done(self) -> bool:
        return self in (RunStatus.finished, RunStatus.failed, RunStatus.canceled)


LIVE = (RunStatus.queued.value, RunStatus.running.value)  # run statuses that still wait for the worker


class StageKind(str, Enum):
    mtl = "mtl"
    finetune = "finetune"
    eval = "eval"


class TaskType(str, Enum):
    classification = "classification"
    generation = "generation"


class Priority(str, Enum):
    high = "high"
    normal = "normal"
    low = "low"


class PruneTarget(str, Enum):
    """Which stage models `stl disk --prune` deletes."""

    finetune = "finetune"
    mtl = "mtl"
    all = "all"

    @property
    def kinds(self) -> tuple[str, ...]:
        if self is PruneTarget.all:
            return (StageKind.mtl.value, StageKind.finetune.value)
        return (self.value,)
