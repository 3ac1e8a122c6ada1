"""The compiled CPU step's single-row products (`matformer.inference.matvec`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matformer.inference.matvec import CpuMatvec, one_row_on_cpu, row_linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_row_linear_is_linear(dtype: torch.dtype, bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype) if bias else None
    x = torch.randn(1, 1, 40, generator=g).to(dtype)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = row_linear(x, w, b)
    assert got.shape == (1, 1, 48) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_the_mode_rewrites_one_row_and_nothing_else() -> None:
    g = torch.Generator().manual_seed(1)
    w, lin = torch.randn(16, 8, generator=g), torch.nn.Linear(8, 16)
    one, many = torch.randn(1, 1, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    assert one_row_on_cpu(one, w) and not one_row_on_cpu(many, w)
    long_rows = torch.randn(8, 16, generator=g)  # float32 rows longer than their count: MKL
    assert not one_row_on_cpu(torch.randn(1, 16), long_rows)
    assert one_row_on_cpu(torch.randn(1, 16).bfloat16(), long_rows.bfloat16())
    with CpuMatvec():
        a, b = F.linear(one, w), F.linear(many, w)
        c = lin(one)  # nn.Linear goes through F.linear too
    assert torch.equal(a, row_linear(one, w))
    assert torch.equal(b, F.linear(many, w))  # batches, prefill and verifies: the BLAS
    assert torch.equal(c, row_linear(one, lin.weight, lin.bias))
