"""What a running stage reports as it goes: after each optimizer step (training) or batch (evaluation)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class StepReport:
    step: int
    total: int
    loss: float  # mean target-token loss since the previous report; NaN during evaluation
    learning_rate: float
    samples_per_s: float
    tokens_per_s: float
    elapsed_s: float
    micro_batch: int
    grad_accum: int
    phase: str = "train"  # "train", or "eval" (step/total then count examples)
    # Model FLOP utilisation since the previous report: 6 * trainable parameters * tokens (source + target,
    # no padding) per second over the GPU's peak bf16 FLOP/s. None on CPU, on an unknown GPU, and in eval.
    mfu: float | None = None

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        return {key: (None if isinstance(v, float) and not math.isfinite(v) else v) for key, v in values.items()}
