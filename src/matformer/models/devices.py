"""Which devices a run may name: checked before any process group, model or tensor exists, so
`--device cuda` on a CPU-only build, `--device foo` or `--device 1e3` are one-line ConfigErrors
(torch raises an AssertionError or a RuntimeError listing twenty device types otherwise).
Library-level, so train() and convert() called from Python get the same check as the CLI."""

from __future__ import annotations

from matformer.errors import ConfigError

KINDS = ("cpu", "cuda", "mps")


def check_device(device: object, flag: str = "--device", allow_auto: bool = False) -> None:
    """A ConfigError unless `device` names a device of KINDS that this machine has (None:
    the default; "auto" where `allow_auto`)."""
    if device is None or (allow_auto and device == "auto"):
        return
    import torch

    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"{flag} {device!r} is not a device (cpu, cuda, cuda:1, mps)")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{flag} {str(device)[:40]!r} is not a device (cpu, cuda, cuda:1, "
                          f"mps)") from None
    if dev.type not in KINDS:
        raise ConfigError(f"{flag} {device}: matformer runs on cpu, cuda or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {device}: CUDA is not available on this machine (or this "
                              f"torch build); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {device}: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag} {device}: MPS is not available on this machine")
