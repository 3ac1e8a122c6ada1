"""Sizes checked before anything is allocated: a model whose parameters cannot fit the device is
a one-line ConfigError naming the flags, not an allocator traceback after minutes (or the OOM
killer). `--hidden-size 10**9` asks for ~10^18 bytes; the check is a product of the parameter
counts `shapes` already computes, and the memory the device has.
"""

from __future__ import annotations

import os
from typing import Any

from matformer.errors import ConfigError

TRAIN_BYTES_PER_PARAMETER = 16
"""float32 weights, gradients and two AdamW moments."""


def device_bytes(device: Any = "cpu") -> int | None:
    """Total memory of `device` (physical RAM for the CPU, the GPU's for CUDA); None: unknown."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info(device)[1])
        except (RuntimeError, AssertionError, ValueError):
            return None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def check_fits(parameters: int, bytes_per_parameter: float, device: Any, what: str,
               hint: str = "use smaller sizes") -> None:
    """A ConfigError when `parameters` x `bytes_per_parameter` exceeds the memory `device` has
    (`what` names the model and the flags that sized it)."""
    need = parameters * bytes_per_parameter
    have = device_bytes(device)
    if have is not None and need > have:
        raise ConfigError(f"{what}: {parameters:,} parameters need about {_gb(need)} on "
                          f"{device}, which has {_gb(have)}; {hint} (nothing was allocated)")
