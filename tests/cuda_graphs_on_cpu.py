"""CUDA graph recording, played on a CPU for tests: what `GreedyDecoder(step=DecodingStep.RECORDED)` records must
neither wait for the device (a recording refuses host syncs) nor depend on values read on the host while it
was recorded (a replay repeats the recorded kernels with their arguments as they were)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any
from unittest import mock

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from stl.jobs.ml.cuda_graphs import GraphRecorder, waits_for_the_device
from stl.jobs.ml.decoding import GreedyDecoder

# transformers 4 checks on the host whether a BART-family model's cross-attention mask is all ones (a sync,
# even while a recording is under way); from transformers 5 on their steps record.
BART_FAMILY_RECORDS = int(transformers.__version__.split(".")[0]) >= 5


class NoHostSync(TorchDispatchMode):
    """Fails on the operations that wait for the device (stl.jobs.ml.cuda_graphs.waits_for_the_device): a CUDA graph
    recording refuses them."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        refuse_host_syncs(func, args, kwargs)
        return func(*args, **kwargs)


def refuse_host_syncs(func: Any, args: Any, kwargs: Any) -> None:
    """The CPU's tensors stand for a GPU's: reading any back to the host is a sync, and so is making a tensor
    from host data (torch.tensor(...) in the step: on a GPU a copy to the device, which waits for it)."""
    if waits_for_the_device(func, args, kwargs, torch.device("cpu")):
        raise AssertionError(f"the recorded step waits for the device ({func}): CUDA graphs would refuse it")


class Taping(TorchDispatchMode):
    """Notes every operation run under it (refusing host syncs, as a recording does), and keeps the first
    value of every tensor an operation writes, for `TapeGraph.capture_end` to put back."""

    def __init__(self, tape: list[tuple[Any, Any, Any, Any]], before: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.tape, self.before = tape, before

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        refuse_host_syncs(func, args, kwargs)
        for argument, value in zip(func._schema.arguments, args, strict=False):
            written = argument.alias_info is not None and argument.alias_info.is_write
            if written and isinstance(value, torch.Tensor) and id(value) not in self.before:
                self.before[id(value)] = (value, value.clone())
        out = func(*args, **kwargs)
        self.tape.append((func, args, kwargs, out))
        return out


class TapeGraph:
    """torch.cuda.CUDAGraph's contract, on a CPU: recording runs nothing (whatever the recorded step wrote is
    put back as it was) and each replay runs the recorded operations again on the same tensors (the graph's
    fixed addresses), with every other argument as it was at recording: a step that reads a Python value
    (a length, a position) at recording keeps reading that value, as it would on a GPU."""

    def __init__(self) -> None:
        self.tape: list[tuple[Any, Any, Any, Any]] = []
        self.before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording: list[Any] = []
        self.ended = False

    def capture_begin(self, capture_error_mode: str = "global") -> None:
        assert not self.tape, "a graph is recorded once"
        self.recording = [mock.patch("torch.cuda.is_current_stream_capturing", return_value=True),
                          Taping(self.tape, self.before)]
        for context in self.recording:
            context.__enter__()

    def capture_end(self) -> None:
        self.ended = True
        for context in reversed(self.recording):
            context.__exit__(None, None, None)
        for tensor, value in self.before.values():
            tensor.copy_(value)

    def replay(self) -> None:
        for func, args, kwargs, recorded in self.tape:
            fresh = func(*args, **kwargs)
            pairs = zip(recorded, fresh, strict=True) if isinstance(recorded, tuple | list) else [(recorded, fresh)]
            for old, new in pairs:
                if isinstance(old, torch.Tensor) and new is not old:
                    old.copy_(new)  # the graph wrote this operation's output where the recording put it

    def pool(self) -> None:
        return None


class NoStream:
    """The side stream's part: the CPU runs everything in order."""

    def wait_stream(self, other: Any) -> None: ...
    def synchronize(self) -> None: ...


class RecorderOnCpu(GraphRecorder):
    """GraphRecorder with a stream that does nothing for the side stream."""

    def side_stream(self, device: torch.device) -> Any:
        return NoStream()


class TapedOnCpu(GreedyDecoder):
    """GreedyDecoder(step=DecodingStep.RECORDED) with its own `_replay`, run on a CPU: `TapeGraph` stands in
    for torch.cuda.CUDAGraph, and a stream that does nothing for the side stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._recorder = RecorderOnCpu(self.model)
        self.shapes: list[tuple[int, int]] = []  # (rows, source tokens) of each batch decoded
        self.recordings = 0
        self.graphs: list[TapeGraph] = []  # every recording begun

    def _new_graph(self) -> TapeGraph:
        self.graphs.append(TapeGraph())
        return self.graphs[-1]

    def _replay(self, batch: Any) -> None:
        recording = batch.graph is None
        super()._replay(batch)
        self.recordings += recording

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with (
            mock.patch("torch.cuda.CUDAGraph", self._new_graph),
            mock.patch("torch.cuda.stream", lambda _: nullcontext()),
            mock.patch("torch.cuda.current_stream", NoStream),
        ):
            self.shapes.append((input_ids.size(0), input_ids.size(1)))
            return super().decode(input_ids, attention_mask, **kwargs)
