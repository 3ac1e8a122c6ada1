"""Few-row products as reductions, for the compiled decoding step on a CPU.

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
(`benchmarks/speed/llamacpp_speed.py`) decodes 1.7-1.9x faster with it in float32 and 2x in
bfloat16 (docs/INFERENCE.md). Inside one compiled graph this holds for every weight shape,
the long-row float32 ones included (`few_rows_on_cpu`).

The same holds for a few rows (a speculative verify of k+1 tokens, a small batch): MKL's
small-row product on one thread reads the weights at a third of the one-row rate, while the
reduction with the rows as its inner loop reads each weight row once for all of them.

`CpuMatvec` is a `TorchFunctionMode` that rewrites `F.linear` (every `nn.Linear` and the model
files' own `F.linear` on sliced weights) this way when the input is at most `FEW_ROWS` rows on
the CPU, and leaves every other call alone (prefill, larger batches, GPUs). It is entered
inside the function `torch.compile` traces (`static_cache.compiled_forward`), so dynamo records
the reduction in the graph and the mode costs nothing per step; run eagerly it would allocate
an (out, in) temporary and be slower, so it is never used outside compilation. Sums run in
float32 (as the BLAS accumulates) for every weight dtype; only the summation order differs.

With one torch thread, two cases go to the hand-written kernels of `row_kernel` instead: one row
by a float16/bfloat16 weight (inductor's half-precision reduction is conversion-bound) and
attention of up to 8 query rows (PyTorch's CPU flash kernel has a fixed cost of about 50 us a
call). Otherwise, inside the same mode, attention of a float16 or bfloat16 model on the CPU runs
in float32 (`attention_in_float32`): PyTorch's CPU flash attention has no fast half-precision path (434
us a call against 61 us in float32 at the 41.7M benchmark shape, a third of a float16 step),
and the casts of a decoding step's few query rows and cached keys and values are small.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from matformer.inference import row_kernel
from matformer.inference.row_kernel import HALF

FEW_ROWS = 8
"""Products of up to this many rows (a verify of k + 1 <= 8 tokens, a batch of up to 8 rows)
run as reductions too: MKL's small-row product on one thread reads the weights at a third of
the one-row rate (a 2-token verify cost 2.8x a one-token step at 41.7M; as reductions, 1.15x)."""


def row_linear(x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x holding at most `FEW_ROWS` rows (shape (..., in)):
    the product as a float32 multiply-and-sum over `in` (or `row_kernel.row_matmul` where it
    applies), cast back to x's dtype. With several
    rows the rows are the inner loop (each weight row is read once, for all of them), and the
    rows are materialized first: left as an expression, inductor recomputes them (the norm
    before the product) for every output, which made the product 2x slower than MKL's."""
    rows = x.shape[:-1].numel()
    if row_kernel.applies(x, weight):
        y = row_kernel.row_matmul(x, weight)
    elif rows == 1:
        y = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
    else:
        flat = _materialized(x.reshape(rows, x.shape[-1])).float()
        y = (flat.unsqueeze(0) * weight.float().unsqueeze(1)).sum(-1).t()
        y = y.reshape(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _materialized(rows: torch.Tensor) -> torch.Tensor:
    """`rows` (M, in) as a buffer of their own in the compiled graph (inductor's
    `inductor_force_stride_order`, registered by `static_cache.compiled_forward`); eagerly,
    contiguous."""
    if not torch.compiler.is_compiling():
        return rows.contiguous()
    return torch.ops.prims.inductor_force_stride_order(rows, [rows.shape[1], 1])


def few_rows_on_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `F.linear(x, weight)` is a product of at most `FEW_ROWS` rows on the CPU, which
    `row_linear` does faster once compiled, for every weight shape and dtype: inside one graph
    the reductions stream even the long-row (512, 4096) float32 down projection at 21 GB/s
    against MKL's 15 (`benchmarks/speed/matvec.py`: timed one call at a time, the compiled
    function's own call overhead had hidden that)."""
    if not (x.device.type == "cpu" and weight.dim() == 2 and x.dim() >= 1
            and x.dtype.is_floating_point):
        return False
    return x.shape[:-1].numel() <= FEW_ROWS


def attention_in_float32(q: torch.Tensor) -> bool:
    """Whether attention with query `q` runs in float32 inside `CpuMatvec`: a half-precision
    query on the CPU."""
    return q.device.type == "cpu" and q.dtype in HALF


def upcast(a: Any) -> Any:
    """`a` in float32 if it is a half-precision tensor, else `a`."""
    return a.float() if isinstance(a, torch.Tensor) and a.dtype in HALF else a


def linear_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    """(input, weight, bias) of an `F.linear` call, however they were passed."""
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    return args[0], weight, args[2] if len(args) > 2 else kwargs.get("bias")


def attention_on_float32(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """The attention call `func(*args, **kwargs)` on float32 copies of its half-precision
    inputs, cast back to the query's dtype."""
    y = func(*map(upcast, args), **{k: upcast(v) for k, v in kwargs.items()})
    return y.to(args[0].dtype)


class CpuMatvec(TorchFunctionMode):
    """Within it, `F.linear` of at most `FEW_ROWS` rows on the CPU runs as `row_linear`, and
    attention on the CPU as `row_kernel.decode_attention` where that applies, else in float32
    for half precision (enter it only inside a function being compiled)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = linear_args(args, kwargs)
            if few_rows_on_cpu(x, weight):
                return row_linear(x, weight, bias)
        elif (func is F.scaled_dot_product_attention
              and row_kernel.attention_applies(*args, **kwargs)):
            return row_kernel.decode_attention(*args, **kwargs)
        elif func is F.scaled_dot_product_attention and attention_in_float32(args[0]):
            return attention_on_float32(func, args, kwargs)
        return func(*args, **kwargs)
