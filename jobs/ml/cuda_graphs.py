"""CUDA graphs: a step recorded once and replayed with one launch, instead of the host launching its hundreds
of kernels again each time. Training replays graphs that torch.compile recorded (`train.compile:
reduce-overhead`); eval stages record their decoding step themselves (`GraphRecorder`). What replaying
changes, and what stl does about it:

- A replay writes its outputs into the graph's own memory, which the next replay overwrites: gradients that
  training accumulates over micro-batches must be copied out in between (`own_gradients`).
- Recording needs memory of its own, and a shape first met late in a stage may not find it in the
  allocator's cache of eager blocks (`ShapesSeen` tells the step when to empty that cache); the pools of
  graphs let go must be handed back (`free_graph_pools`).
- A recording refuses a step that waits for the device (`waits_for_the_device`): `GraphRecorder` refuses
  such an operation before it runs, which would otherwise void the recording.
- Inductor may decline to use CUDA graphs for a compiled graph; the stage log says so (`TrainingGraphNotes`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from stl.jobs.ml.acceleration import cuda_graph_skips

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    import torch

# Operations that wait for the device to hand a value to the host (a CUDA graph recording refuses them).
HOST_SYNC_OPERATIONS = frozenset({
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
    "aten::masked_select", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim", "aten::bincount",
})
_COPIES = frozenset({"aten::_to_copy", "aten::copy_", "aten::_copy_from", "aten::_copy_from_and_resize"})
_FROM_HOST_DATA = frozenset({"aten::lift_fresh", "aten::lift_fresh_copy"})  # torch.tensor(data)


def waits_for_the_device(func: Any, args: Sequence[Any], kwargs: dict[str, Any], device: torch.device) -> bool:
    """Whether the operation `func(*args, **kwargs)`, about to run, would wait for `device`: it reads a
    value of a tensor on `device` back to the host (an item, a size decided on the device), or copies
    between `device` and the host (torch.tensor(0, device="cuda") is such a copy). A CPU `device` stands in
    for a GPU (tests/cuda_graphs_on_cpu.py): its tensors are the GPU's, and making a tensor from host data,
    which on a GPU is copied to it, counts as that copy."""
    import torch
    from torch.utils._pytree import tree_leaves

    name = func._schema.name
    if device.type == "cpu" and name in _FROM_HOST_DATA:
        return True
    a_copy = device.type != "cpu" and name in _COPIES
    if name not in HOST_SYNC_OPERATIONS and not a_copy:
        return False  # most operations: decided without looking at their tensors
    tensors = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
    if name in HOST_SYNC_OPERATIONS:
        return any(t.device.type == device.type for t in tensors)
    target = kwargs.get("device")
    places = {t.device.type for t in tensors} | ({torch.device(target).type} if target is not None else set())
    return "cpu" in places and device.type in places


def _refusing_host_syncs(model: Any, device: torch.device) -> Any:
    """A context (of this thread) in which an operation that would wait for `device` raises
    StepNotRecordable before it runs: a recording ended then is still valid, so ending it leaves torch's
    CUDA state as it was (a recording voided by a sync leaves its CUDA random state marked as recording)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from stl.jobs.errors import StepNotRecordable

    class RefuseHostSyncs(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if waits_for_the_device(func, args, kwargs, device):
                raise StepNotRecordable(
                    f"{type(model).__name__}'s decoding step waits for the GPU ({func._schema.name}), "
                    "so it cannot be recorded as a CUDA graph"
                )
            return func(*args, **kwargs)

    return RefuseHostSyncs()


class GraphRecorder:
    """Records a step as a CUDA graph: the step runs once for real on a side stream (lazy initialisations,
    such as cuBLAS workspaces, must happen outside a recording), then is recorded there, with host syncs
    refused. Replaying the graph runs the step again on the same buffers."""

    def __init__(self, model: Any) -> None:
        self.model = model  # named where its step cannot be recorded
        self._stream: Any = None  # the side stream that warms up and records graphs

    def record(self, step: Callable[[], None], device: torch.device) -> Any:
        """A torch.cuda.CUDAGraph of `step`, which has just run once (this token, decoded for real)."""
        import torch

        stream = self.side_stream(device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        # Not torch.cuda.graph(): it also collects garbage and empties the allocator's cache each time,
        # which costs more than the recording itself.
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            # thread_local: other threads' CUDA calls (a prefetch thread) cannot invalidate the recording.
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                # Recorded, not run: the buffers stay as the warm-up step left them. A host sync is refused
                # before it can void the recording (transformers skips some while a recording is under way).
                with _refusing_host_syncs(self.model, device):
                    step()
            except BaseException:
                _abandon_recording(graph, device)
                raise
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        return graph

    def side_stream(self, device: torch.device) -> Any:
        """The stream that warms up and records graphs, made on first use."""
        import torch

        if self._stream is None:
            if device.type != "cuda":
                raise ValueError(f"a recorded decoding step needs a CUDA device; this batch is on {device}")
            self._stream = torch.cuda.Stream(device=device)
        return self._stream


def _abandon_recording(graph: Any, device: torch.device) -> None:
    """End a recording the step broke (a host sync, say), so that the allocator serves the eager
    decoding that follows normally."""
    import torch

    try:
        graph.capture_end()
    except Exception:
        # Where ending the void recording fails, torch (2.11) leaves the allocator routing this
        # thread's memory to the graph pool; its own emptying and out-of-memory retry stay off.
        with contextlib.suppress(Exception):
            index = torch.cuda.current_device() if device.index is None else device.index
            torch._C._cuda_endAllocateToPool(index, graph.pool())


def free_graph_pools() -> None:
    """Give the memory pools of the CUDA graphs just let go back to the device. Each graph has a pool of
    its own, which the allocator frees only when asked outside a recording: without this, the pools of
    dropped batch shapes would pile up until a recording ran out of memory (and the stage halved its
    batches for nothing)."""
    import torch

    torch.cuda.empty_cache()


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
