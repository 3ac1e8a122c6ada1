"""Float16 prompts on a CPU computed in float32 (`matformer.inference.half_on_cpu`)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from matformer.inference.half_on_cpu import HalfOnCpu, half_on_cpu
from matformer.inference.matvec import FEW_ROWS


def test_prompt_products_and_attention_run_in_float32_and_nothing_else() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g).half()
    b = torch.randn(24, generator=g).half()
    prompt = torch.randn(1, FEW_ROWS + 4, 16, generator=g).half()
    row = prompt[:, :1]
    q = torch.randn(1, 4, 12, 8, generator=g).half()
    k, v = (torch.randn(1, 2, 12, 8, generator=g).half() for _ in range(2))
    with HalfOnCpu():
        got = F.linear(prompt, w, b)
        got_row = F.linear(row, w, b)
        got_bf16 = F.linear(prompt.bfloat16(), w.bfloat16())
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    want = F.linear(prompt.float(), w.float(), b.float()).half()
    assert got.dtype == torch.float16 and torch.equal(got, want)
    assert torch.equal(got_row, F.linear(row, w, b))  # a few rows: MKL's float16 path
    assert torch.equal(got_bf16, F.linear(prompt.bfloat16(), w.bfloat16()))
    want_att = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                              enable_gqa=True).half()
    assert att.dtype == torch.float16 and torch.equal(att, want_att)


def test_only_a_float16_model_on_the_cpu_enters_the_mode() -> None:
    lin = torch.nn.Linear(4, 4)
    assert isinstance(half_on_cpu(lin), contextlib.nullcontext)
    assert isinstance(half_on_cpu(lin.bfloat16()), contextlib.nullcontext)
    assert isinstance(half_on_cpu(lin.half()), HalfOnCpu)
