"""The compiled CPU step's few-row products (`matformer.inference.matvec`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matformer.inference.matvec import CpuMatvec, few_rows_on_cpu, row_linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_row_linear_is_linear(dtype: torch.dtype, bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype) if bias else None
    x = torch.randn(1, 3, 40, generator=g).to(dtype)  # three rows (one row: below)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = row_linear(x, w, b)
    assert got.shape == (1, 3, 48) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(row_linear(x[:, :1], w, b).float(), want[:, :1], rtol=tol,
                               atol=tol)


def test_the_mode_rewrites_a_few_rows_and_nothing_else() -> None:
    g = torch.Generator().manual_seed(1)
    w, lin = torch.randn(16, 8, generator=g), torch.nn.Linear(8, 16)
    one = torch.randn(1, 1, 8, generator=g)
    few = torch.randn(2, 3, 8, generator=g)  # 6 rows: a verify, a small batch
    many = torch.randn(3, 4, 8, generator=g)  # 12 rows: a prompt
    assert few_rows_on_cpu(one, w) and few_rows_on_cpu(few, w)
    assert not few_rows_on_cpu(many, w)
    long_rows = torch.randn(8, 16, generator=g)  # rows longer than their count: the same
    assert few_rows_on_cpu(torch.randn(1, 16), long_rows)
    assert few_rows_on_cpu(torch.randn(1, 16).bfloat16(), long_rows.bfloat16())
    assert not few_rows_on_cpu(torch.ones(1, 16, dtype=torch.long), long_rows)
    with CpuMatvec():
        a, b, c = F.linear(one, w), F.linear(few, w), F.linear(many, w)
        d = lin(few)  # nn.Linear goes through F.linear too
    assert torch.equal(a, row_linear(one, w))
    assert torch.equal(b, row_linear(few, w)) and b.shape == (2, 3, 16)
    torch.testing.assert_close(b, F.linear(few, w), rtol=1e-5, atol=1e-5)
    assert torch.equal(c, F.linear(many, w))  # prompts: the BLAS
    assert torch.equal(d, row_linear(few, lin.weight, lin.bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_attention_runs_in_float32_inside_the_mode(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 2, 8, generator=g).to(dtype)  # 4 query heads, 2 rows
    k, v = (torch.randn(1, 2, 5, 8, generator=g).to(dtype) for _ in range(2))  # 2 KV heads
    mask = torch.ones(2, 5, dtype=torch.bool).tril(3)
    with CpuMatvec():
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        same = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=True).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(same, F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                            enable_gqa=True))
