"""Compilation paid once (issue 28): where compiled kernels are kept, what compiling cost, and
precompiled decode steps that a later process loads instead of tracing.

The time saved across processes (a second `generate --compile` compiling under 10% of the
first's time) takes minutes of inductor work: `benchmarks/speed/compile_cache.py` measures it.
Here: the cache folder's rules, the report line, what tells models apart in a precompiled
graph's key, that a saved graph is loaded and runs the model it is given (weights are inputs),
and never when a global it read, its file or its key says otherwise (AOTAutograd's "aot_eager"
backend on a Linear: tracing and saving, no kernels built, about a second); then, slow, a
decoder's graphs and `matformer generate --compile` in new processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from matformer.data.text import save_tokenizer, train_tokenizer
from matformer.inference import compile_cache
from matformer.inference.compile_cache import (
    CompileStats,
    PrecompiledStep,
    compile_cache_dir,
    compile_stats,
    model_key,
    step_key,
)
from matformer.inference.static_cache import StaticDecoder
from matformer.io.checkpoint import save_model
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


def test_the_report_says_what_was_compiled_and_what_was_loaded() -> None:
    assert CompileStats(graphs=2, seconds=41.25, saved=2).describe().startswith(
        "compiled 2 graphs in 41.2 s (saved for later runs: 2; cache: ")
    assert CompileStats(graphs=1, seconds=0.412, precompiled=1).describe().startswith(
        "loaded 1 precompiled graph in 0.41 s (nothing traced or built; cache: ")
    both = CompileStats(graphs=3, seconds=12.0, precompiled=2, saved=1).since(CompileStats())
    assert both.describe().startswith("compiled 1 graph and loaded 2 precompiled graphs in "
                                      "12.0 s (saved for later runs: 1; cache: ")


def _step(model: torch.nn.Module, *args: object) -> torch.Tensor:
    return model.forward_static(*args)


def test_the_key_tells_apart_what_guards_do_not_see() -> None:
    """Weights are inputs of the graph: two models of one config share a key. The config, the
    dtype, the training flag, the threads, the width setting and each argument's shape and
    value do not."""
    a, b = tiny_lm(0), tiny_lm(1)
    key = model_key(a, _step, "inductor/None")
    assert model_key(b, _step, "inductor/None") == key
    assert model_key(tiny_lm(0, rope_theta=500.0), _step, "inductor/None") != key
    assert model_key(tiny_lm(0, rms_norm_eps=1e-5), _step, "inductor/None") != key
    assert model_key(tiny_lm(0).to(torch.bfloat16), _step, "inductor/None") != key
    assert model_key(tiny_lm(0).train(), _step, "inductor/None") != key
    assert model_key(a, _step, "aot_eager/None") != key
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(n + 1)
        assert model_key(a, _step, "inductor/None") != key
    finally:
        torch.set_num_threads(n)
    with torch.inference_mode():
        cache, pad = a.new_cache(1, 16), torch.zeros(1, dtype=torch.long)
        one = (torch.tensor([[4]]), torch.arange(3, 4), cache, pad, False)
        two = (torch.tensor([[4, 5]]), torch.arange(3, 5), cache, pad, False)
        assert step_key(key, a, one) == step_key(key, b, one)
        assert step_key(key, a, two) != step_key(key, a, one)
        assert step_key(key, a, (*one[:4], True)) != step_key(key, a, one)
        assert step_key(key, a, (one[0], one[1], a.new_cache(1, 32), pad, False)) != \
            step_key(key, a, one)
        with a.at_width(tier=1):
            assert step_key(key, a, one) != step_key(key, b, one)


SCALE = 2.0
"""A global the toy step reads: a graph saved under one value must not run under another."""


def _toy(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x) * SCALE


def _linear(seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 4).to(dtype)


def test_a_saved_graph_is_loaded_and_runs_the_model_it_is_given(tmp_path, one_thread) -> None:
    x = torch.randn(3, 8)
    first = PrecompiledStep(_toy, "aot_eager", folder=tmp_path)
    before = compile_stats()
    with torch.no_grad():
        assert torch.equal(first(_linear(0), x), _linear(0)(x) * 2)
        made = compile_stats().since(before)
        assert (made.graphs, made.saved, made.precompiled) == (1, 1, 0)
        assert len(list(tmp_path.glob("*.pt2"))) == 1
        later = PrecompiledStep(_toy, "aot_eager", folder=tmp_path)  # as a new process would
        before = compile_stats()
        other = _linear(1)  # other weights of the same shape: the same graph, its own output
        assert torch.equal(later(other, x), other(x) * 2)
        loaded = compile_stats().since(before)
        assert (loaded.graphs, loaded.saved, loaded.precompiled) == (1, 0, 1)
        assert torch.equal(later(_linear(0), x), _linear(0)(x) * 2)  # in memory now
        assert compile_stats().since(before).graphs == 1
        half = _linear(0, torch.float64)  # another key: another graph, another file
        assert torch.equal(later(half, x.double()), half(x.double()) * 2)
        assert len(list(tmp_path.glob("*.pt2"))) == 2


def test_a_saved_graph_is_not_used_when_its_global_or_its_file_changed(
        tmp_path, monkeypatch, one_thread) -> None:
    x, lin = torch.randn(3, 8), _linear(0)
    with torch.no_grad():
        PrecompiledStep(_toy, "aot_eager", folder=tmp_path)(lin, x)
        monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)
        before = compile_stats()
        assert torch.equal(PrecompiledStep(_toy, "aot_eager", folder=tmp_path)(lin, x),
                           lin(x) * 3)  # the saved graph's guard on SCALE failed
        assert compile_stats().since(before).precompiled == 0
        (path,) = tmp_path.glob("*.pt2")
        path.write_bytes(b"not a graph")  # torn or foreign: compiled again and replaced
        before = compile_stats()
        assert torch.equal(PrecompiledStep(_toy, "aot_eager", folder=tmp_path)(lin, x),
                           lin(x) * 3)
        assert compile_stats().since(before).saved == 1
        before = compile_stats()
        PrecompiledStep(_toy, "aot_eager", folder=tmp_path)(lin, x)
        assert compile_stats().since(before).precompiled == 1


class _Narrowable(torch.nn.Module):
    """A layer whose active width is a plain int attribute, as MatFormer's FFN widths are."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.width = _linear(0), 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)[:, :self.width]


def _narrowable_step(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def test_a_loaded_graph_guards_the_width_it_was_compiled_at(tmp_path, one_thread) -> None:
    """A module's int attribute is a saved guard: a graph loaded for width 4 is not run at
    width 2, even when nothing else (its file name here) tells them apart."""
    x, layer = torch.randn(3, 8), _Narrowable()
    with torch.no_grad():
        PrecompiledStep(_narrowable_step, "aot_eager", folder=tmp_path)(layer, x)
        layer.width = 2
        before = compile_stats()
        out = PrecompiledStep(_narrowable_step, "aot_eager", folder=tmp_path)(layer, x)
        assert out.shape == (3, 2) and torch.equal(out, layer.lin(x)[:, :2])
        assert compile_stats().since(before).precompiled == 0


def _unsaveable_backend(gm: torch.fx.GraphModule, inputs: list) -> object:
    return gm.forward  # a plain callable: torch cannot save it


def test_a_backend_that_cannot_precompile_falls_back_to_dynamo(tmp_path, one_thread) -> None:
    x, lin = torch.randn(3, 8), _linear(0)
    step = PrecompiledStep(_toy, _unsaveable_backend, folder=tmp_path)
    with torch.no_grad():
        assert torch.equal(step(lin, x), lin(x) * 2)
        assert torch.equal(step(lin, x), lin(x) * 2)
    assert not list(tmp_path.glob("*.pt2"))


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


TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * 7}\n" for i in range(100)]


def _generate(ckpt: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MATFORMER_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return subprocess.run([sys.executable, "-m", "matformer.cli", "generate", str(ckpt),
                           "--prompt", "def f(", "--max-new-tokens", "12", "--threads", "1",
                           *extra], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_second_generate_compile_loads_what_the_first_compiled(tmp_path) -> None:
    """Slow (a minute: inductor builds the kernels once): `generate --compile` in a new process
    loads the first one's precompiled graph, traces and builds nothing, and prints what eager
    decoding prints."""
    tok = train_tokenizer(TEXTS, 300)
    ckpt = tmp_path / "model"
    save_model(tiny_lm(0, distinct=True, vocab_size=tok.get_vocab_size()), ckpt)
    save_tokenizer(tok, ckpt)
    cache = tmp_path / "cache"
    eager = _generate(ckpt, cache)
    first = _generate(ckpt, cache, "--compile")
    second = _generate(ckpt, cache, "--compile")
    for run in (eager, first, second):
        assert run.returncode == 0, run.stderr[-2000:]
    assert first.stdout == second.stdout == eager.stdout
    assert "compiled 1 graph in" in first.stderr and "saved for later runs: 1" in first.stderr
    assert "loaded 1 precompiled graph in" in second.stderr
    assert "nothing traced or built" in second.stderr
    assert len(list((cache / "inductor" / compile_cache.STEPS).glob("*.pt2"))) == 1
    # inductor's per-process compiler probes, answered once and kept beside the kernels
    assert (cache / "inductor" / compile_cache.HEADERS).is_file()
    assert (cache / "inductor" / compile_cache.ISA_BUILDS).is_file()
