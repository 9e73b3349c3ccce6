"""Faults of the machine rather than of a stage: a full disk, a GPU that stopped working.

A stage that fails on one goes back to the head of its queue instead of failing its runs, and the
worker takes no more work until `machine_problem` finds nothing wrong: without this, one broken
driver or full disk would fail every queued run of every user in minutes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

from stl.jobs.disk_space import check_home_writable, free_space
from stl.jobs.errors import StlError

if TYPE_CHECKING:
    from collections.abc import Callable

    from stl.jobs.faults import Faults
    from stl.jobs.settings import Settings

# A stage that meets a machine fault this many times fails after all: the fault may be its own doing
# (a model too big for the disk, a kernel that crashes this GPU), and the queue must move on.
MAX_MACHINE_FAULTS = 3
# Below this on STL_HOME's disk a stage would only fill it again: 1 GiB, or a twentieth of a smaller disk (on a
# disk of a few GiB, or a small test tmpfs, 1 GiB could never be free).
MIN_FREE_BYTES = 1 << 30
MIN_FREE_FRACTION = 0.05
HEALTH_CHECK_EVERY_S = 30.0  # while a worker is paused by a machine fault
# A machine fault is announced to the other workers of the host for this long (renewed while it lasts): each
# checks the machine before its next stage instead of meeting the fault again (and using up the stage's tries).
HOST_FAULT_TTL_S = 120
GPU_CHECK_TIMEOUT_S = 180  # a new process importing torch and creating a CUDA context
_MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}
# The same errnos as a Rust library (safetensors, tokenizers) words them in its error's text.
_RUST_MACHINE_ERRNO = re.compile(r"\(os error (" + "|".join(str(code) for code in sorted(_MACHINE_ERRNOS)) + r")\)")
# What torch and the driver say when the GPU or its driver is broken, as opposed to a stage's own error.
_DEVICE_FAULT = re.compile(
    r"CUDA driver|CUDA error|cudaError|CUDA-capable device|CUDA initiali[sz]ation|NVML|CUBLAS_STATUS_NOT_INITIALIZED"
    r"|CUDNN_STATUS_NOT_INITIALIZED|no kernel image is available", re.IGNORECASE)
# Errors a stage causes itself (out of memory has its own retry; a device-side assert is a bad index).
_STAGE_FAULT = re.compile(r"out of memory|device-side assert", re.IGNORECASE)
_GPU_CHECK = "import torch; torch.cuda.init(); print(float(torch.ones(64, device='cuda').sum()))"


def machine_fault(error: BaseException) -> str | None:
    """One line saying how `error` is the machine's fault, or None if it is the stage's own."""
    seen: BaseException | None = error
    for _ in range(6):  # the error and what it was raised from: a loader wraps what the driver said
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in _MACHINE_ERRNOS:
            return f"{os.strerror(seen.errno)}" + (f" ({seen.filename})" if seen.filename else "")
        detail = " ".join(str(seen).split())
        rust_errno = _RUST_MACHINE_ERRNO.search(detail)
        if rust_errno:
            return f"{os.strerror(int(rust_errno.group(1)))} ({type(seen).__name__}: {detail[:300]})"
        if _DEVICE_FAULT.search(detail) and not _STAGE_FAULT.search(detail):
            return f"{type(seen).__name__}: {detail[:300]}"
        seen = seen.__cause__ or seen.__context__
    return None


def room_wanted(total_bytes: int, need_bytes: int = 0) -> int:
    """Free bytes a disk of `total_bytes` needs before a stage may run: what the stage's failed write needed
    (`need_bytes`, 0 if unknown), plus a margin (MIN_FREE_BYTES, or MIN_FREE_FRACTION of a smaller disk)."""
    return need_bytes + min(MIN_FREE_BYTES, int(total_bytes * MIN_FREE_FRACTION))


def machine_problem(settings: Settings, *, gpu: bool, faults: Faults,
                    keep_alive: Callable[[], None] = lambda: None, need_bytes: int = 0) -> str | None:
    """What stops this machine from running a stage now, or None. Run by the worker's parent, which never
    touches CUDA itself: the GPU is tried in a new process, during which `keep_alive` is called every
    second (the worker's heartbeat must not stop while a wedged driver makes it wait). `need_bytes`: what
    the write that met a full disk needed (stl.jobs.durable.DiskFull), so the stage is not retried into it."""
    if faults.disk_full_now():
        return "no space left on the disk under STL_HOME (injected)"
    space = free_space(settings.home)
    if space is not None and space[0] < room_wanted(space[1], need_bytes):
        needed = (f", and the stage that filled it needs about {room_wanted(space[1], need_bytes) / (1 << 20):.1f} "
                  "MiB" if need_bytes else "")
        return (f"only {space[0] / (1 << 20):.1f} MiB free on the disk under STL_HOME ({settings.home}){needed}; "
                "`stl disk --prune finetune` frees finished runs' few-shot models")
    try:
        check_home_writable(settings)
    except StlError as e:
        return str(e)
    return _gpu_problem(keep_alive) if gpu else None


def _gpu_problem(keep_alive: Callable[[], None]) -> str | None:
    with tempfile.TemporaryFile() as errors:
        check = subprocess.Popen([sys.executable, "-c", _GPU_CHECK], stdout=subprocess.DEVNULL, stderr=errors)
        deadline = time.monotonic() + GPU_CHECK_TIMEOUT_S
        while check.poll() is None:
            if time.monotonic() > deadline:
                check.kill()
                # A process stuck in the driver may not even die: never wait for it without a limit.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    check.wait(timeout=5)
                return f"the GPU did not answer a new process within {GPU_CHECK_TIMEOUT_S} s"
            keep_alive()
            time.sleep(1.0)
        if check.returncode == 0:
            return None
        errors.seek(0)
        last = (errors.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        return f"the GPU does not work in a new process: {last[:300]}"
