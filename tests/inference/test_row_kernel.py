"""The C++ kernels of the compiled CPU step (`matformer.inference.row_kernel`): a one-row product
by a half-precision weight and attention of a few query rows, checked against PyTorch."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from matformer.inference import row_kernel
from matformer.inference.compile_cache import CompileStats, compile_stats, cpu_flags
from matformer.inference.matvec import CpuMatvec, row_linear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cpu_has(*flags: str) -> bool:
    return set(flags) <= set(cpu_flags())


@pytest.fixture
def kernel() -> Iterator[None]:
    """The kernels built and used (one thread), or the test skipped where they cannot be."""
    if not row_kernel.available():
        pytest.skip("row_kernel.cpp does not build here (no C++ compiler, or no AVX2/AVX-512)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert row_kernel.refresh()
    yield
    torch.set_num_threads(threads)
    row_kernel.refresh()


def test_it_builds_where_the_cpu_and_a_compiler_allow() -> None:
    if not row_kernel.wanted() or not (_cpu_has("avx2", "f16c", "fma")
                                       or _cpu_has("avx512f", "avx512bw", "avx512vl")):
        pytest.skip("no x86-64 vector CPU or no C++ compiler here")
    assert row_kernel.available(), row_kernel._FAILED
    assert row_kernel.isa() in ("avx512", "avx2")


def test_a_failed_build_is_remembered_and_not_retried(tmp_path: Path) -> None:
    failing = shutil.which("false")
    if failing is None:
        pytest.skip("no `false` command")
    before = compile_stats()
    assert row_kernel._build(failing, tmp_path) is None
    assert compile_stats().since(before).kernel_seconds > 0  # the user waited: reported
    (marker,) = tmp_path.glob("row_kernel-*.failed")
    assert row_kernel._build(failing, tmp_path) is None  # the marker answers
    assert list(tmp_path.glob("row_kernel-*")) == [marker]  # no library, no temporary left


def test_it_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(row_kernel.ENV, "0")
    assert not row_kernel.wanted()


def test_it_is_used_with_one_thread_only(kernel: None) -> None:
    torch.set_num_threads(2)
    assert not row_kernel.refresh()
    x, w = torch.randn(1, 64), torch.randn(32, 64).half()
    assert not row_kernel.applies(x, w)
    torch.set_num_threads(1)
    assert row_kernel.refresh() and row_kernel.applies(x, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_matmul_is_linear(kernel: None, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    # whole vector blocks, a tail, a row shorter than a vector, and a tier's column slice
    for out, k in [(256, 512), (37, 100), (5, 3)]:
        w = torch.randn(out, k, generator=g).to(dtype)
        x = torch.randn(1, 1, k, generator=g)
        got = row_kernel.row_matmul(x, w)
        assert got.shape == (1, 1, out) and got.dtype == torch.float32
        torch.testing.assert_close(got, F.linear(x, w.float()), rtol=1e-5, atol=1e-4)
    full = torch.randn(64, 300, generator=g).to(dtype)
    w, x = full[:, :130], torch.randn(130, generator=g)
    assert w.stride() == (300, 1)
    torch.testing.assert_close(row_kernel.row_matmul(x, w), F.linear(x, w.float()), rtol=1e-5,
                               atol=1e-4)


def test_products_use_it_for_one_row_by_a_half_precision_weight(kernel: None) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 64, generator=g)
    half, single = torch.randn(32, 64, generator=g).half(), torch.randn(32, 64, generator=g)
    assert row_kernel.applies(x.half(), half) and row_kernel.applies(x, half.bfloat16())
    assert not row_kernel.applies(x, single)  # float32: inductor's fused reduction is as fast
    assert not row_kernel.applies(torch.randn(2, 64), half)  # rows of a verify: reductions
    assert not row_kernel.applies(x, half.t().contiguous().t()[:, :64])  # column-major
    with CpuMatvec():
        got = F.linear(x.half(), half)
    assert torch.equal(got, row_kernel.row_matmul(x.half(), half).half())
    assert torch.equal(row_linear(x.half(), half), got)


def _attention_case(g: torch.Generator, dtype: torch.dtype, B: int, H: int, KVH: int, T: int,
                    L: int, D: int) -> tuple[torch.Tensor, ...]:
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    # the cache holds one head more than the width reads: k and v are head slices of it
    k = torch.randn(B, KVH + 1, L, D, generator=g).to(dtype)[:, :KVH]
    v = torch.randn(B, KVH + 1, L, D, generator=g).to(dtype)[:, :KVH]
    mask = torch.rand(B, 1, T, L, generator=g) > 0.4
    mask[..., 0] = True
    return q, k, v, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8, 2, 1, 64, 64), (3, 4, 4, 3, 17, 40),
                                   (2, 6, 3, 2, 33, 16)])
def test_decode_attention_is_sdpa(kernel: None, dtype: torch.dtype,
                                  shape: tuple[int, ...]) -> None:
    q, k, v, mask = _attention_case(torch.Generator().manual_seed(2), dtype, *shape)
    gqa = q.shape[1] != k.shape[1]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for m in (mask, mask[:1], mask[:, :, :1], None):  # per row, broadcast rows, no mask
        kw = {"attn_mask": m, "scale": 0.3, "enable_gqa": gqa}
        assert row_kernel.attention_applies(q, k, v, **kw)
        got = row_kernel.decode_attention(q, k, v, **kw)
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    with CpuMatvec():
        inside = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    assert torch.equal(inside, row_kernel.decode_attention(q, k, v, attn_mask=mask,
                                                           enable_gqa=gqa))


def test_attention_it_does_not_compute_is_left_to_pytorch(kernel: None) -> None:
    q, k, v, mask = _attention_case(torch.Generator().manual_seed(3), torch.float32,
                                    1, 4, 2, 2, 9, 8)
    assert not row_kernel.attention_applies(q, k, v, attn_mask=mask)  # 4 heads on 2: no gqa
    assert not row_kernel.attention_applies(q, k, v, attn_mask=mask.float(), enable_gqa=True)
    assert not row_kernel.attention_applies(q, k, v, is_causal=True, enable_gqa=True)
    assert not row_kernel.attention_applies(q, k, v, dropout_p=0.1, enable_gqa=True)
    assert not row_kernel.attention_applies(torch.randn(1, 4, 9, 8), k, v, enable_gqa=True)
    assert not row_kernel.attention_applies(q, k.half(), v, enable_gqa=True)


def test_a_query_that_sees_nothing_gets_nan_as_in_softmax(kernel: None) -> None:
    q, k, v, mask = _attention_case(torch.Generator().manual_seed(4), torch.float32,
                                    1, 2, 2, 1, 5, 16)
    got = row_kernel.decode_attention(q, k, v, attn_mask=torch.zeros_like(mask))
    assert torch.isnan(got).all()


@pytest.mark.parametrize("dtype", [torch.float16])
def test_compiled_decoding_with_the_kernels_matches_eager(kernel: None, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          dtype: torch.dtype) -> None:
    from matformer.inference.static_cache import StaticDecoder
    from matformer.models.lm.config import MatFormerConfig
    from matformer.models.lm.model import MatFormerLM

    monkeypatch.setenv("MATFORMER_CACHE", str(tmp_path))
    monkeypatch.setenv("MATFORMER_DECODE_STEP", "0")  # the compiled graph, not the C++ step
    torch.manual_seed(0)
    cfg = MatFormerConfig(vocab_size=128, hidden_size=64, intermediate_size=256,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64)
    model = MatFormerLM(cfg).eval().to(dtype)
    prompt = [torch.arange(7)]
    eager, compiled = (StaticDecoder(model, 1, 32, compile=c) for c in (False, True))
    tol = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(compiled.prefill(prompt), eager.prefill(prompt), **tol)
    for tok in (5, 9, 11):  # decoding steps: one row, both kernels in the compiled graph
        ids = torch.tensor([[tok]])
        torch.testing.assert_close(compiled.step(ids), eager.step(ids), **tol)
    # (a verify's several query rows: the attention kernel's tests above, T up to 3)
    with torch.profiler.profile() as prof:
        compiled.step(torch.tensor([[2]]))
    called = {e.name for e in prof.events()}
    assert {"matformer::row_matmul", "matformer::decode_attention"} <= called


def test_the_kernel_build_is_reported_beside_the_graphs() -> None:
    line = CompileStats(graphs=1, seconds=40.0, saved=1, kernel_seconds=6.04).describe()
    assert line.startswith("compiled 1 graph in 40.0 s (") and "C++ kernels built in 6.0 s" in line
    assert "C++ kernels" not in CompileStats(graphs=1, seconds=40.0, saved=1).describe()
