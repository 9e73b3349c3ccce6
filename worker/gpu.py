"""What the worker says about its GPU: read through NVML, which never creates a CUDA context."""

from __future__ import annotations

from typing import Any


class GpuProbe:
    """NVML handle for one device index; reports "cpu" where there is no NVIDIA GPU or driver."""

    def __init__(self, index: int | None) -> None:
        self.index = index
        self._handle: Any = None
        self._nvml: Any = None
        try:
            import pynvml  # from nvidia-ml-py

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index or 0)
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no driver, no library, no device: all mean "cpu"
            self._handle = None

    @property
    def has_gpu(self) -> bool:
        return self._handle is not None

    def read(self) -> dict[str, str]:
        if self._handle is None or self._nvml is None:
            return {"gpu": "cpu", "gpu_util": "", "gpu_mem_used_mb": "", "gpu_mem_total_mb": ""}
        nvml = self._nvml
        try:
            name = nvml.nvmlDeviceGetName(self._handle)
            util = nvml.nvmlDeviceGetUtilizationRates(self._handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except Exception:  # noqa: BLE001 - a transient NVML error must not stop the worker
            return {"gpu": "unknown", "gpu_util": "", "gpu_mem_used_mb": "", "gpu_mem_total_mb": ""}
        return {
            "gpu": name.decode() if isinstance(name, bytes) else str(name),
            "gpu_util": str(util.gpu),
            "gpu_mem_used_mb": f"{memory.used / 2**20:.0f}",
            "gpu_mem_total_mb": f"{memory.total / 2**20:.0f}",
        }


def missing_gpu(index: int) -> str | None:
    """Why GPU `index` cannot be used, or None if it can; asks NVML, which creates no CUDA context."""
    try:
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
        count = int(pynvml.nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001 - no library, no driver: no NVIDIA GPU to pick
        return f"--gpu {index}: this machine has no NVIDIA GPU that NVML can see; leave out --gpu to work on the CPU"
    if index >= count:
        return (f"--gpu {index}: this machine has {count} NVIDIA GPU(s), numbered 0 to {count - 1}"
                if count else f"--gpu {index}: this machine has no NVIDIA GPU; leave out --gpu to work on the CPU")
    return None
