"""Which device a stage runs on and in which precision: one rule for every command."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from dsel.errors import DselError


def resolve_device(name: str) -> torch.device:
    """"auto" -> the GPU when there is one, else the CPU; a GPU asked for on a machine without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DselError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DselError(f"device={name} but no GPU is available")
    return device


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on GPU (the default), or on CPU when asked; fp32 otherwise."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    raise DselError(f"precision must be auto, bf16 or fp32, got {precision!r}")


@contextmanager
def tf32_matmuls(enabled: bool):
    """Inside the block, fp32 matmuls (torch's and the fused head's tl.dot) may use TF32 tensor cores
    when `enabled` (10-bit mantissa products, fp32 accumulation; several times the fp32 FMA rate on
    A100/H100), and are exact IEEE fp32 otherwise. The previous setting is restored afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
