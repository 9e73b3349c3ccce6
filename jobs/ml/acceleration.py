"""Keeping a GPU busy and surviving its memory running out: what training and evaluation share.

- Compiling: whether torch.compile pays on a device, its on-disk caches under STL_HOME/cache, and dynamo's
  recompile limit raised to cover the shapes a stage compiles.
- Length buckets: a compiled step is reused only on the shapes it was made for, so sequences are padded
  to a few fixed lengths.
- Out of memory: recognising torch's out-of-memory error however it is wrapped, and handing the memory
  back before a retry with smaller batches.
- CUDA graphs: inductor's count of the graphs it ran without them, for the stage log.
- Model FLOP utilisation: training's achieved FLOP/s over the GPU's peak.
"""

from __future__ import annotations

import gc
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    import torch

BUCKET_MIN = 32  # shortest padded length when compiling
INDUCTOR_CACHE_DIR = "inductor"  # under STL_HOME/cache
# Dense (no sparsity) bf16 tensor-core peak FLOP/s by a substring of torch.cuda.get_device_name(), case
# ignored; fp16 for GPUs without bf16 (T4, V100). First match wins, so specific names precede general ones.
# None: known to be ambiguous, so no MFU rather than a wrong one.
PEAK_FLOPS: tuple[tuple[str, float | None], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
    ("A10G", None),  # AWS's variant of the A10, with its own clocks
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("RTX 4090", 165e12),
    ("T4", 65e12),
    ("V100", 125e12),
)


# --- compiling ---


def compile_pays_on(device: torch.device) -> bool:
    """Whether torch.compile is worth its compile time on `device`: on CUDA, not on a CPU, where stages are
    smoke tests of a few steps and inductor's C++ build would take longer than the training."""
    return device.type == "cuda"


def use_compile_caches(cache_dir: Path) -> Path:
    """Point inductor's (and Triton's) on-disk caches under `cache_dir`, so compiled graphs and kernels
    survive this work horse and are reused by later stages and runs. Inductor reads these variables
    lazily, so setting them before the first compiled call is enough; the horse is one process per stage.
    """
    directory = cache_dir / INDUCTOR_CACHE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    os.environ["TRITON_CACHE_DIR"] = str(directory / "triton")
    return directory


def prepare_compile(cache_dir: Path | None, *, shapes: int) -> str:
    """Ready torch.compile for `shapes` static shapes: dynamo gives up compiling a function after
    `recompile_limit` shapes (8 by default) and runs the rest eager, so the limit is raised to cover
    them; inductor's caches go under `cache_dir`. Returns where the caches are, for the stage's log."""
    import torch._dynamo

    config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit_name, max(int(getattr(config, limit_name)), shapes))
    if cache_dir is None:
        return "inductor's default cache (no cache_dir)"
    return str(use_compile_caches(cache_dir))


def cuda_graph_skips() -> int:
    """How many times inductor has declined to use CUDA graphs in this process (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


# --- length buckets ---


def length_buckets(cap: int, smallest: int = BUCKET_MIN) -> tuple[int, ...]:
    """The padded lengths allowed for sequences of at most `cap` tokens: powers of two from `smallest`,
    then `cap` itself.

    Powers of two keep the shapes to log2(cap / smallest) + 1 per dimension (a 512-token source and a
    64-token target make 5 x 2 shapes to compile), at the price of padding on top of length grouping (less
    than half of a padded row, about a quarter on average). Each new shape costs a compile of tens of
    seconds, once per cache; without compile nothing is saved by fixed shapes, so eager training keeps
    padding to the longest row of the batch, which is always the least work.
    """
    widths = []
    width = smallest
    while width < cap:
        widths.append(width)
        width *= 2
    widths.append(cap)
    return tuple(widths)


def bucketed_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` (`length` itself if none does, which truncation prevents)."""
    return next((width for width in buckets if width >= length), length)


# --- out of memory ---


def caused_by_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch's out-of-memory error, wraps one, or was raised while handling one.

    torch.compile wraps an error raised while it compiles in BackendCompilerFailed (`inner_exception`),
    and a CUDA graph whose recording runs out of memory can end in a RuntimeError from the abandoned
    capture, raised while the OOM is handled: both are the GPU running out of memory, so the stage
    halves its batch as it would for a plain OOM instead of failing.
    """
    import torch

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, torch.OutOfMemoryError):
            return True
        seen.add(id(current))
        inner = getattr(current, "inner_exception", None)
        if isinstance(inner, BaseException):
            current = inner
        elif current.__cause__ is not None or current.__suppress_context__:  # `raise ... from` says which
            current = current.__cause__
        else:
            current = current.__context__
    return False


def release_accelerator_memory(*, compiled: bool) -> None:
    """Hand back what a dropped model held on the GPU, before a retry with smaller batches."""
    import torch

    if compiled and torch.cuda.is_available():
        import torch._dynamo

        # The dropped model's graphs would hold its memory and count against the recompile limit; the
        # retry's shapes come back from inductor's on-disk cache where they were compiled before.
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- model FLOP utilisation ---


def model_flops_utilization(params: int, tokens: int, seconds: float, peak: float | None) -> float | None:
    """Achieved training FLOP/s over `peak`, counting 6 FLOPs per parameter per token (forward 2, backward 4).

    The usual decoder-only estimate, and issue 6's definition (its reference figures use it). For an
    encoder-decoder each token runs through only one of the two stacks and embedding lookups cost nothing,
    so the figure overstates such a model's utilisation (about 2.9x at bart-base, 256->32); attention's own
    FLOPs are left out. None without a peak or a positive duration.
    """
    if peak is None or peak <= 0 or seconds <= 0:
        return None
    return 6.0 * params * tokens / seconds / peak


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU called `device_name` (see PEAK_FLOPS); None if unknown."""
    name = device_name.lower()
    for part, peak in PEAK_FLOPS:
        if part.lower() in name:
            return peak
    return None
