"""An eval stage's work in batches: of similar source length, with progress reported and stop requests heard
after each, and halved for the rest of the stage when the GPU runs out of memory."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from stl.jobs.errors import OutOfMemory, StageCanceled, StagePreempted
from stl.jobs.ml.acceleration import caused_by_out_of_memory
from stl.jobs.ml.examples import source_text
from stl.jobs.ml.progress import StepReport

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import torch

    from stl.jobs.ml.evaluate import EvalRun
    from stl.jobs.ml.examples import Example


class EvalBatches:
    """Runs work over examples `rows` at a time. Out of GPU memory, `rows` halves for the rest of the stage and
    the batch is tried again in smaller ones, down to one example; only a single example that does not fit
    fails the stage."""

    def __init__(
        self,
        cfg: EvalRun,
        device: torch.device,
        *,
        rows: int,
        total: int,  # examples in the stage, for the progress reports
        on_step: Callable[[StepReport], None],
        on_out_of_memory: Callable[[], None],  # frees what a failed batch may have left (decoding buffers)
    ) -> None:
        self.cfg, self.spec, self.device = cfg, cfg.spec, device
        self.rows = rows  # halved for the rest of the stage if the GPU runs out of memory
        self.total, self.on_step, self.on_out_of_memory = total, on_step, on_out_of_memory
        self.done = 0
        self.started = time.perf_counter()

    def run(self, examples: Sequence[Example], positions: Sequence[int], work: Callable[[list[int]], None]) -> None:
        """`work` on batches of `positions` (into `examples`), reporting progress after each."""

        def work_and_report(batch: list[int]) -> None:
            work(batch)
            self._between_batches(len(batch))

        self._each_batch(self._sorted_batches(examples, positions), work_and_report)

    def _sorted_batches(self, examples: Sequence[Example], positions: Sequence[int]) -> list[list[int]]:
        """`positions` (into `examples`) in batches of similar source length (less padding)."""
        order = sorted(
            positions,
            key=lambda i: (len(source_text(examples[i], self.spec.instructions)), i),
        )
        size = self.rows
        return [order[first : first + size] for first in range(0, len(order), size)]

    def _each_batch(self, batches: list[list[int]], work: Callable[[list[int]], None]) -> None:
        import torch

        pending = list(batches)
        while pending:
            batch = pending.pop(0)
            try:
                if self.cfg.oom_over_rows is not None and len(batch) > self.cfg.oom_over_rows:
                    raise torch.OutOfMemoryError("injected")
                work(batch)
                continue
            except Exception as e:
                if not caused_by_out_of_memory(e):
                    raise
                if len(batch) == 1:
                    raise OutOfMemory(
                        f"eval stage {self.spec.stage_id} ran out of GPU memory on a single example of "
                        f"{self.spec.model}; lower eval.max_source_length or eval.max_new_tokens, or free the GPU"
                    ) from e
            # Out of the except block: the failed attempt's tensors are garbage by now.
            self.on_out_of_memory()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.rows = max(1, min(self.rows, len(batch)) // 2)
            self.cfg.log(f"out of GPU memory with a batch of {len(batch)}; going on with batches of "
                         f"{self.rows} (set eval.batch_size to {self.rows} to start there)")
            rest = [*batch, *(i for later in pending for i in later)]
            pending = [rest[first : first + self.rows] for first in range(0, len(rest), self.rows)]

    def _between_batches(self, finished: int) -> None:
        self.done += finished
        elapsed = time.perf_counter() - self.started
        self.on_step(
            StepReport(
                step=self.done,
                total=self.total,
                loss=math.nan,
                learning_rate=0.0,
                samples_per_s=self.done / max(elapsed, 1e-9),
                tokens_per_s=0.0,
                elapsed_s=elapsed,
                micro_batch=self.rows,
                grad_accum=1,
                phase="eval",
            )
        )
        request = self.cfg.should_stop()
        if request == "cancel":
            raise StageCanceled(f"eval stage {self.spec.stage_id} was canceled")
        if request == "preempt":
            raise StagePreempted(f"eval stage {self.spec.stage_id} was interrupted and will start again")
