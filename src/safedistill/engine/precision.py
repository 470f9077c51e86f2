"""Precision on the device, two separate choices:

- `dtype` (model section): what the weights are STORED in. auto = bf16 on a CUDA device with bf16
  support, fp32 on CPU (so CPU runs keep their numbers: the CPU default was, and stays, fp32).
  Frozen weights take it; trained parameters are always fp32 master weights (models.py:
  weights_dtype, prepare_student).
- `precision` (optim section): bf16 AUTOCAST for the teacher and student passes where the hardware
  runs it natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX), float32 otherwise.

bf16 weights with precision fp32 compute in the weights' dtype (bf16 matmuls; fp32 LoRA adapters);
fp32 weights with precision bf16 is the autocast this project had before `dtype` existed. Losses are
always computed in float32 (divergence.py upcasts the logits)."""

from __future__ import annotations

import contextlib
import functools

import torch

from ..errors import UserError


@functools.cache
def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 matrices natively (oneDNN), not by emulation."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """'fp32' or 'bf16' for `precision` (fp32 | bf16 | auto) on `device`."""
    kind = torch.device(device).type
    native = torch.cuda.is_available() and torch.cuda.is_bf16_supported() if kind == "cuda" else cpu_has_bf16()
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and kind not in ("cpu", "cuda"):
        raise UserError(f"config field 'precision': bf16 autocast is not supported on {kind}")
    if precision not in ("fp32", "bf16"):
        raise UserError(f"config field 'precision' must be fp32, bf16 or auto (got {precision!r})")
    return precision


def autocast(precision: str, device: str | torch.device):
    """A bf16 autocast context for 'bf16', a no-op for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
