"""How long `torch.compile` has spent compiling in this process: so `--compile` runs report the
compile time apart from the decoding speed (issue 24: a first compiled call at a width costs
seconds to minutes, and was charged to tokens/s)."""

from __future__ import annotations

from matformer.inference.compile_cache import precompile_seconds


def compile_seconds() -> float:
    """Seconds Dynamo has spent compiling frames (graph capture and the backend's compilation:
    its `_compile.compile_inner` record) since the process started, plus what precompiled
    decode steps spent compiling ahead of time or loading (`precompile_seconds`: Dynamo's
    record leaves them out). Differences of two readings time the compilations in between."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # a torch without Dynamo's metrics: nothing else to report
        return precompile_seconds()
    return (float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))
            + precompile_seconds())
