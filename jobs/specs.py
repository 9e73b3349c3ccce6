"""Frozen specs for stages and runs. A stage's id is the hash of its resolved spec."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stl.jobs.metrics import ChoosableMetric  # noqa: TC001 - pydantic reads the annotation at runtime
from stl.jobs.states import Priority, RunStatus, StageKind, TaskType

__all__ = ["EvalConfig", "Priority", "RunSpec", "RunStatus", "StageKind", "StageSpec", "TaskType", "TrainConfig"]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrainConfig(Frozen):
    max_steps: Annotated[int, Field(gt=0, le=10_000_000)] = 1000
    batch_size: Annotated[int, Field(gt=0, le=4096)] = 16
    grad_accum: Annotated[int, Field(gt=0, le=1024)] = 1
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = 5.0e-5
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.06
    weight_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    max_source_length: Annotated[int, Field(gt=0, le=8192)] = 512
    max_target_length: Annotated[int, Field(gt=0, le=2048)] = 64
    checkpoint_every: Annotated[int, Field(gt=0, le=10_000_000)] = 200
    # Examples-proportional mixing cap (T5/T0): no task contributes more than this many examples.
    mixture_cap: Annotated[int, Field(gt=0, le=1_000_000_000)] = 500_000
    # true: torch.compile with inductor's default mode; "reduce-overhead": also replay each step's kernels as
    # CUDA graphs (torch's mode of that name). CUDA only; a CPU stage trains eager.
    compile: bool | Literal["reduce-overhead"] = False

    @field_validator("compile", mode="before")
    @classmethod
    def _one_compile_message(cls, value: object) -> object:
        # One message for the union, not one per member type.
        if isinstance(value, bool) or value == "reduce-overhead":
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            raise ValueError("expected true, false or reduce-overhead; write true or false without quotes")
        raise ValueError("expected true, false or reduce-overhead")


class EvalConfig(Frozen):
    max_examples: Annotated[int, Field(gt=0, le=1_000_000)] = 200
    batch_size: Annotated[int, Field(gt=0, le=4096)] = 32
    max_new_tokens: Annotated[int, Field(gt=0, le=2048)] = 64
    max_source_length: Annotated[int, Field(gt=0, le=8192)] = 512
    samples: Annotated[int, Field(ge=0, le=100)] = 5
    # Greedy decoding with a static KV cache that torch.compile turns into CUDA graphs (CUDA only).
    compile: bool = False
    # The classification accuracy that results report first (all three are recorded): jobs/metrics.py.
    metric: ChoosableMetric = "accuracy"


class StageSpec(Frozen):
    """One unit of GPU work. `parent` is the stage whose final model this one starts from."""

    kind: StageKind
    model: str
    parent: str | None = None
    seed: int = 0
    instructions: bool = True
    data: str  # absolute path to an InstructDial JSONL, or hf:<dataset>[:<config>]
    tasks: tuple[str, ...]
    shots: int = 0  # finetune: k examples of each task; 0 otherwise
    # finetune: the first `holdout` rows of each task are its eval examples, so shots come from the rest
    holdout: int = 0
    train: TrainConfig | None = None
    eval: EvalConfig | None = None

    @property
    def stage_id(self) -> str:
        spec = self.model_dump(mode="json")
        # Stages without these keep the ids they had before the fields existed.
        if not spec["holdout"]:
            del spec["holdout"]
        if spec["eval"] is not None and not spec["eval"]["compile"]:
            del spec["eval"]["compile"]
        if spec["eval"] is not None and spec["eval"]["metric"] == "accuracy":
            del spec["eval"]["metric"]
        return content_hash(spec)[:20]

    @property
    def work(self) -> int:
        """How much work the stage is, in examples through the model (training: steps x batch; evaluation:
        examples scored), so that a run's progress weighs a 2000-step MTL stage above a 12-step few-shot one."""
        if self.train is not None:
            return self.train.max_steps * self.train.batch_size  # batch_size is per step, however accumulated
        if self.eval is not None:
            return self.eval.max_examples * max(len(self.tasks), 1)
        return 1


class RunSpec(Frozen):
    """One cell of a grid, resolved. Its id is the hash of everything that affects its results."""

    grid: str
    cell: dict[str, Any]
    stages: tuple[str, ...]  # stage ids, in execution order
    eval_stages: tuple[str, ...]  # the stages whose metrics make this run's results

    @property
    def run_id(self) -> str:
        return content_hash({"grid": self.grid, "cell": self.cell, "stages": list(self.stages)})[:16]


def content_hash(obj: object) -> str:
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()
