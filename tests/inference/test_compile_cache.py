"""Compilation paid once (issue 28): where compiled kernels are kept, and what compiling cost.

The cross-process reuse itself (a second `generate --compile` compiling under 10% of the
first's time) takes minutes of inductor work: `benchmarks/speed/compile_cache.py` measures it.
Here: the cache folder's rules, and that a decoder's compiling is counted and timed once (with
dynamo's "eager" backend: tracing only, no kernels built)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from matformer.inference.compile_cache import CompileStats, compile_cache_dir, compile_stats
from matformer.inference.static_cache import StaticDecoder
from tests.conftest import tiny_lm


def test_compile_cache_folder_follows_matformer_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("MATFORMER_CACHE", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "inductor"
    monkeypatch.delenv("MATFORMER_CACHE")
    assert compile_cache_dir() == Path.home() / ".cache" / "matformer" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's wins
    assert compile_cache_dir() == tmp_path / "mine"


def test_compile_stats_of_one_call() -> None:
    later = CompileStats(graphs=3, seconds=12.5, cache_hits=2, cache_misses=1)
    one = later.since(CompileStats(graphs=1, seconds=2.5, cache_hits=1))
    assert one == CompileStats(2, 10.0, 1, 1)
    assert one.describe().startswith("compiled 2 graphs in 10.0 s (kernels built: 1, loaded "
                                     "from the cache: 1")
    assert "nothing compiled" in CompileStats().describe()


@pytest.mark.slow
def test_compiling_is_counted_and_timed_once(one_thread) -> None:
    """Slow: dynamo's first trace in a process takes seconds (10+ on the busy CI machine)."""
    torch._dynamo.reset()
    model = tiny_lm(0)
    dec = StaticDecoder(model, 1, 32, compile=True, backend="eager")
    dec.prefill([torch.tensor([1, 2, 3])])
    before = compile_stats()
    dec.step(torch.tensor([[4]]))
    first = compile_stats().since(before)
    assert first.graphs == 1 and first.seconds > 0
    again = compile_stats()
    dec.step(torch.tensor([[5]]))
    assert compile_stats().since(again) == CompileStats()
    assert "compiled 1 graph in" in first.describe()
    torch._dynamo.reset()
