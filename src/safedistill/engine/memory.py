"""Peak memory per training step, for metrics.jsonl (`peak_memory_mb`).

CUDA: torch's peak allocated bytes on the device (tensors only, not the caching allocator's
reserve), reset at the start of each step. CPU: the process's peak resident set size (VmHWM),
reset through /proc/self/clear_refs where Linux allows it; otherwise getrusage's max RSS, which
is the peak since the process started and never goes down. The CPU figure is the whole process
(interpreter, libraries, every model it holds), not the step's tensors alone.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _device(device: str | torch.device) -> torch.device:
    return torch.device(device)


def reset_peak_memory(device: str | torch.device) -> bool:
    """Start a new peak; False when the figure cannot be reset here (CPU without clear_refs)."""
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return True
    try:
        _CLEAR_REFS.write_text("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _vm_hwm_kib() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_memory_mb(device: str | torch.device) -> float:
    """MiB: CUDA max allocated since the last reset, or the CPU process's peak RSS."""
    dev = _device(device)
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    kib = _vm_hwm_kib()
    if kib is None:  # ru_maxrss: KiB on Linux, bytes on macOS
        raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = raw // 1024 if sys.platform == "darwin" else raw
    return kib / 1024


def step_peak_memory_mb(device: str | torch.device) -> float:
    """The peak since the previous call (or the last reset), then a new peak starts: one figure per
    metrics row."""
    peak = peak_memory_mb(device)
    reset_peak_memory(device)
    return round(peak, 1)
