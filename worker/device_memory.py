"""The device's memory as it is now (NVML, never a CUDA context: the worker's parent must not make one), a
fixed budget standing in for a GPU in tests, and how processes share the GPU (CUDA MPS or time-slicing)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stl.jobs.faults import Faults
    from stl.jobs.queue.admission import DeviceMemory

MPS_CONTROL = "nvidia-cuda-mps-control"
MPS_DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"  # noqa: S108 - CUDA's own default, not a file stl makes


class NvmlDeviceMemory:
    """Total and free memory of one GPU as NVML reports it: every process's use counts, stl's or not."""

    def __init__(self, index: int | None) -> None:
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml: Any = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index or 0)

    def total_and_free(self) -> tuple[int, int]:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return int(info.total), int(info.free)

    def used_by_process(self, pid: int) -> int | None:
        try:
            processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:  # noqa: BLE001 - an NVML error only means "not known": the full estimate counts
            return None
        for process in processes:
            used = getattr(process, "usedGpuMemory", None)
            # Under MPS, or in a container with its own pid namespace, NVML cannot tell (None, or no such pid).
            if process.pid == pid and isinstance(used, int):
                return used
        return None


class FixedDeviceMemory:
    """A device of `total` bytes of which processes outside stl hold `used_outside`: for tests on the CPU
    (STL_FAULT_INJECT=device_memory=<bytes>). What stl's own stages use is not seen: their estimates count."""

    def __init__(self, total: int, used_outside: int = 0) -> None:
        self.total = total
        self.used_outside = used_outside

    def total_and_free(self) -> tuple[int, int]:
        return self.total, max(self.total - self.used_outside, 0)

    def used_by_process(self, pid: int) -> int | None:
        return None


def device_memory_for(faults: Faults, *, has_gpu: bool, gpu_index: int | None, slots: int) -> DeviceMemory | None:
    """What admission by memory reads, or None where the worker takes each stage as it comes, one at a time: the
    fake device of the fault-injection setting, or NVML for a GPU worker with more than one slot."""
    if faults.device_memory is not None:
        return FixedDeviceMemory(faults.device_memory, faults.device_memory_used)
    if has_gpu and slots > 1:
        return NvmlDeviceMemory(gpu_index)
    return None


def sharing_mode(*, has_gpu: bool, environ: dict[str, str] | None = None) -> str:
    """How the stages of one GPU share it: "MPS" where the CUDA MPS control daemon runs (its binary on PATH
    and its control socket in CUDA_MPS_PIPE_DIRECTORY, default /tmp/nvidia-mps), else "time-slicing";
    "cpu" without a GPU."""
    if not has_gpu:
        return "cpu"
    env = os.environ if environ is None else environ
    if shutil.which(MPS_CONTROL, path=env.get("PATH")) is None:
        return "time-slicing"
    control = Path(env.get("CUDA_MPS_PIPE_DIRECTORY") or MPS_DEFAULT_PIPE_DIRECTORY) / "control"
    try:
        return "MPS" if stat.S_ISSOCK(control.stat().st_mode) or stat.S_ISFIFO(control.stat().st_mode) \
            else "time-slicing"
    except OSError:
        return "time-slicing"
