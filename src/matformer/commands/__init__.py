"""One module per CLI verb: `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def draft_tokens_arg(text: str) -> int | str:
    """argparse type of --draft-tokens: a positive integer, 'adaptive' or 'auto'."""
    if text in ("adaptive", "auto"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, 'adaptive' or 'auto', got {text!r}")
    return value


def draft_tier_arg(text: str) -> int | str:
    """argparse type of --draft-tier: a tier (non-negative integer) or 'auto'."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a tier (0, 1, ...) or 'auto', got {text!r}")
    return value


MAX_THREADS = 1024


def set_threads(threads: int | None) -> None:
    """--threads: None keeps torch's choice; otherwise a positive count."""
    if threads is None:
        return
    if not 1 <= threads <= MAX_THREADS:  # torch crashes (SIGSEGV) with ~100000 threads
        raise ConfigError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
    import torch

    torch.set_num_threads(threads)


def check_device(device: str | None) -> None:
    """--device must name a device torch knows and this machine has (one-line errors)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device!r}: matformer runs on cpu, cuda or mps")
