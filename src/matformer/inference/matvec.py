"""Single-row products as reductions, for the compiled decoding step on a CPU.

A batch-1 decoding step multiplies one row (1, in) by every weight matrix (out, in): it is
memory-bound, and its speed is the rate at which the weights stream from DRAM. PyTorch's CPU
`F.linear` for one row calls the BLAS (MKL) matrix-vector product, which on this project's
development CPU (AMD EPYC, AVX-512, 1 thread) streams a float32 (4096, 512) weight at about 11
GB/s and a (512, 4096) one at about 18 GB/s: short rows cost it a fixed overhead per row (and
its bfloat16 path is slower still). The same
product written as an elementwise multiply and a sum over `in` is a reduction that inductor
turns into one vectorized C++ loop over the rows; it streams the (4096, 512) weight at about 20
GB/s (the single-core DRAM rate llama.cpp reaches), and it fuses with the operations around it (norms,
activation, residual adds) instead of being a call out of the graph. The 41.7M benchmark model
(`benchmarks/speed/llamacpp_speed.py`) decodes about 1.4-1.9x faster with it in float32 and 2x in
bfloat16 (docs/INFERENCE.md). Float32 weights with long rows stay with MKL, which streams those
at the memory's rate already (`one_row_on_cpu`).

`CpuMatvec` is a `TorchFunctionMode` that rewrites `F.linear` (every `nn.Linear` and the model
files' own `F.linear` on sliced weights) this way when the input is one row on the CPU, and
leaves every other call alone (prefill, verifies of k+1 tokens, batches, GPUs). It is entered
inside the function `torch.compile` traces (`static_cache.compiled_forward`), so dynamo records
the reduction in the graph and the mode costs nothing per step; run eagerly it would allocate
an (out, in) temporary and be slower, so it is never used outside compilation. Sums run in
float32 (as the BLAS accumulates) for every weight dtype; only the summation order differs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def row_linear(x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x holding one row (shape (..., in) with one row in
    all): the product as a float32 multiply-and-sum over `in`, cast back to x's dtype."""
    y = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def one_row_on_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `F.linear(x, weight)` is a single-row product on the CPU that `row_linear` does
    faster once compiled: every such product except a float32 weight with rows longer than it
    has rows (the (512, 4096) down projection at 41.7M), which MKL already streams at the
    memory's rate (`benchmarks/speed/matvec.py`: 18 GB/s against the reduction's 16)."""
    if not (x.device.type == "cpu" and weight.dim() == 2 and x.dim() >= 1
            and x.shape[:-1].numel() == 1 and x.dtype.is_floating_point):
        return False
    return not (weight.dtype == torch.float32 and weight.shape[1] > weight.shape[0])


class CpuMatvec(TorchFunctionMode):
    """Within it, `F.linear` of a single row on the CPU runs as `row_linear` (enter it only
    inside a function being compiled)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if one_row_on_cpu(x, weight):
                return row_linear(x, weight, bias)
        return func(*args, **kwargs)
