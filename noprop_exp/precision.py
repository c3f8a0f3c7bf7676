"""Which arithmetic the forward passes run in: `train.precision` (fp32, bf16, or auto) resolved
on the device, and the autocast context that applies it. Training, evaluation, the pictures and
the commands that re-read a logged run all use it, so they compute alike."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from noprop_exp.config import Precision


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether `device_type` computes bf16 natively: a CUDA GPU of compute capability 8 or
    more, a CPU with AVX512-BF16 or AMX-BF16 (Linux: read from /proc/cpuinfo). Elsewhere bf16
    is emulated and slower than fp32."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def precision_on(precision: str, device: torch.device) -> Precision:
    """`train.precision` resolved on `device`: `auto` becomes bf16 or fp32 (`native_bf16`)."""
    chosen = Precision(precision)
    if chosen is Precision.auto:
        return Precision.bf16 if native_bf16(device.type) else Precision.fp32
    return chosen


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context forward passes run in: bf16 autocast for train.precision=bf16 (or auto on a
    device with native bf16; weights, optimiser state and gradients stay fp32; no loss scaling is
    needed for bf16), else none."""
    if precision_on(precision, device) is Precision.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
