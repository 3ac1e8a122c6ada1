"""Float16 prompts on a CPU, computed in float32.

PyTorch's CPU kernels for float16 have no fast path on many CPUs: on this project's
development CPU (AMD EPYC, AVX-512, 1 thread) MKL's float16 product of a 64-token prompt by a
(4096, 512) weight took 15.9 ms, the same product in float32 on upcast copies 6.0 ms (the
casts included), bfloat16 4.6 ms; the CPU flash attention is as slow in float16. So a float16
model read its prompts at 0.24x llama.cpp's rate (docs/INFERENCE.md). `HalfOnCpu` is a
`TorchFunctionMode` that runs `F.linear` with a float16 weight and more than `FEW_ROWS` rows,
and float16 attention, in float32 on the CPU and casts the result back: what the prompt's
forward (eager) sees. Products of a few rows keep MKL's float16 matrix-vector path, which
streams at the memory's rate; bfloat16, float32 and GPU tensors are untouched.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from matformer.inference.matvec import (
    FEW_ROWS,
    attention_on_float32,
    linear_args,
    upcast,
)


def _is_half_on_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float16


class HalfOnCpu(TorchFunctionMode):
    """Within it, float16 prompt products and attention on the CPU run in float32."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = linear_args(args, kwargs)
            if _is_half_on_cpu(weight) and x.shape[:-1].numel() > FEW_ROWS:
                return F.linear(upcast(x), weight.float(), upcast(bias)).to(x.dtype)
        elif func is F.scaled_dot_product_attention and _is_half_on_cpu(args[0]):
            return attention_on_float32(func, args, kwargs)
        return func(*args, **kwargs)


def half_on_cpu(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """`HalfOnCpu()` for a float16 model on the CPU, else a context that does nothing (so no
    other model pays the mode's per-call dispatch)."""
    w = next(model.parameters(), None)
    return HalfOnCpu() if w is not None and _is_half_on_cpu(w) else contextlib.nullcontext()
