"""What every benchmark script repeats: where results go, its argument parser, a description of
the machine it ran on, and writing its JSON.

Run the scripts as modules from the repository root (`python -m benchmarks.speed.decode`), so
this module is importable without editing `sys.path`. Kept torch-free at import time: a script's
`--help` must not wait for torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
"""benchmarks/results/: the JSON files docs/*.md cite (paths that must not move)."""


def _prog() -> str | None:
    """`python -m benchmarks.speed.decode` in usage lines when run as a module (argparse would
    say `decode.py`, which does not run: the script imports this package)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", "") or ""
    return f"python -m {name}" if name.startswith("benchmarks.") else None


def parser(doc: str | None, *, full_doc: bool = False) -> argparse.ArgumentParser:
    """An argument parser described by a script's docstring: its first line, or (`full_doc`)
    all of it with the layout kept, for scripts whose docstring explains the experiment."""
    if full_doc:
        return argparse.ArgumentParser(prog=_prog(), description=doc,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    first = doc.strip().splitlines()[0] if doc and doc.strip() else None
    return argparse.ArgumentParser(prog=_prog(), description=first)


DTYPE_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
"""The short dtype names benchmarks take on their command lines, and torch's names for them."""


def dtypes_arg(p: argparse.ArgumentParser, flag: str, text: str) -> dict[str, Any]:
    """The dtypes a comma-separated `flag` value names (short name -> torch dtype), all checked
    before anything runs; an unknown one is a usage error naming it."""
    import torch  # this module stays torch-free at import time

    out = {}
    for name in text.split(","):
        if name not in DTYPE_NAMES:
            p.error(f"{flag}: unknown {name!r}; use {', '.join(DTYPE_NAMES)}")
        out[name] = getattr(torch, DTYPE_NAMES[name])
    return out


def cpu_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty on
    Linux), else whatever platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: Any = None) -> dict[str, Any]:
    """Where the numbers came from: CPU, CPU count, torch and Python versions, platform, load at
    the start, and the GPU's name when `device` (the one the run used) is a CUDA device."""
    import torch

    hw: dict[str, Any] = {
        "nproc": os.cpu_count(), "cpu": cpu_name(), "machine": platform.machine(),
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device is not None and str(device).startswith("cuda"):
        hw["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return hw


def device_name(device: Any) -> str:
    """One word for the device a benchmark ran on: the GPU's name, else the CPU's."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def write_json(path: str | Path, doc: Any, *, indent: int = 2) -> Path:
    """Write a result document (parents created, trailing newline, non-JSON values as str), so
    every script's output reads and diffs the same way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=indent, default=str) + "\n", encoding="utf-8")
    return path
