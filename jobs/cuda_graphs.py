"""CUDA graphs: a step recorded once and replayed with one launch, instead of the host launching its hundreds
of kernels again each time. What replaying changes, and what stl does about it:

- A replay writes its outputs into the graph's own memory, which the next replay overwrites: gradients that
  training accumulates over micro-batches must be copied out in between (`own_gradients`).
- Recording needs memory of its own, and a shape first met late in a stage may not find it in the
  allocator's cache of eager blocks (`ShapesSeen` tells the step when to empty that cache).
- Inductor may decline to use CUDA graphs for a compiled graph; the stage log says so (`TrainingGraphNotes`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobs.acceleration import cuda_graph_skips

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import torch


class ShapesSeen:
    """The distinct tensor shapes of micro-batches met so far."""

    def __init__(self) -> None:
        self.seen: set[tuple[tuple[str, tuple[int, ...]], ...]] = set()

    def first_sight(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether this micro-batch's shapes are new (and remember them)."""
        key = tuple(sorted((name, tuple(tensor.shape)) for name, tensor in tensors.items()))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def own_gradients(params: Iterable[torch.nn.Parameter], owned: set[int]) -> None:
    """Copy out of CUDA graph memory every .grad not copied yet (`owned`: ids of the copies, updated).

    Autograd keeps a replayed backward's output as a parameter's .grad when .grad is empty; the next replay
    overwrites that memory, and would then add its gradient to itself, losing this one (pytorch/pytorch#169545,
    #146569). Once a .grad is a copy, later micro-batches add into it in place. Checked after every
    micro-batch but the last, for a parameter may first get a gradient in a later one (layer drop)."""
    import torch

    targets, grads = [], []
    for param in params:
        if param.grad is not None and id(param.grad) not in owned:
            targets.append(param)
            grads.append(param.grad)
    if not targets:
        return
    copies = torch._foreach_mul(grads, 1.0)  # one multi-tensor copy, not a kernel per gradient
    for param, copy in zip(targets, copies, strict=True):
        param.grad = copy
        owned.add(id(copy))


class TrainingGraphNotes:
    """What the stage log says about CUDA graphs under `train.compile: reduce-overhead`: after the first step
    whether inductor replays them, and later when a new shape's graph falls back to plain compiled kernels
    (inductor's own log says why). Inductor counts a fallback when it compiles: a stage reusing graphs
    compiled earlier in the same process sees none (in the worker each stage has a fresh work horse, so it
    compiles, from the on-disk cache at best)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.skips_seen = cuda_graph_skips()  # inductor's count of skipped CUDA graphs, as last logged
        self.confirmed = False  # "CUDA graphs in use" logged

    def after_step(self, step: int) -> None:
        skips = cuda_graph_skips()
        if skips > self.skips_seen:
            self.log(
                f"step {step}: torch.compile ran {skips - self.skips_seen} graph(s) without CUDA "
                "graphs (compiled kernels only); set TORCH_LOGS=cudagraphs to see why"
            )
        elif not self.confirmed:
            self.log("CUDA graphs in use: each micro-batch's forward and backward replay as recorded graphs")
        self.skips_seen, self.confirmed = skips, True
