"""Shared test helpers: the one tiny-model factory (`tiny_lm`), the one CLI runner (`run_cli`),
a small corpus and a seconds-long training run. Test files import plain helpers from here
(`from tests.conftest import tiny_lm`) and take fixtures by name."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from matformer import MatFormerConfig, MatFormerLM
from matformer.inference import row_kernel
from matformer.training import TrainConfig

HEADS = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=16)
"""4 KV heads of 2 query heads each (r = 2), head_dim 16: heads nest by KV group."""


@pytest.fixture(autouse=True)
def _compiled_steps_forget_the_c_kernels():
    """A compiled decoder built with one thread turns the C kernels on for the process
    (`row_kernel.refresh`); a later test that does not build one must not inherit that."""
    yield
    row_kernel.ENABLED = False


@pytest.fixture
def one_thread():
    """Tiny matmuls: extra threads only add contention on a shared 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_norms_and_biases(model: torch.nn.Module) -> None:
    """Every norm weight (`*norm.weight`) drawn from U(0.5, 1.5) and every bias from N(0, 0.5),
    in parameter order, so a misplaced or dropped norm or bias shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)


def tiny_lm(seed: int | None = 0, *, distinct: bool = False, heads: bool = False,
            random_norms: bool = False, head_scale: float = 1.0, fill: float | None = None,
            config: MatFormerConfig | None = None, **overrides) -> MatFormerLM:
    """A debug-preset MatFormerLM (hidden 64, FFN 256, 2 layers, vocab 512) in eval mode.

    seed: torch.manual_seed before the weights are drawn (None: the current RNG state).
    distinct: widths visibly disagree: at random init the FFN is a small correction, so scale it
        (x8) and the head (x4) up; drafts then get rejected and widths differ.
    heads: nested attention heads (HEADS: 8 query heads on 4 KV heads, head_dim 16).
    random_norms: norm weights drawn from U(0.5, 1.5), so a wrongly copied norm shows.
    head_scale: multiply the lm_head (visible differences between settings).
    fill: every weight set to this value, so which save a tensor came from is visible.
    config: build this config instead of the debug preset (`heads`/`overrides` then unused).
    """
    if seed is not None:
        torch.manual_seed(seed)
    if config is None:
        config = MatFormerConfig.from_preset("debug", **{**(HEADS if heads else {}), **overrides})
    model = MatFormerLM(config).eval()
    with torch.no_grad():
        if random_norms:
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        if distinct:
            for layer in model.model.layers:
                layer.mlp.down_proj.weight.mul_(8)
            head_scale *= 4
        if head_scale != 1.0:
            model.lm_head.weight.mul_(head_scale)
        if fill is not None:
            for p in model.parameters():
                p.fill_(fill)
    return model


class CliRun(NamedTuple):
    """What one `matformer` invocation gave: exit status, stdout, stderr."""

    code: int
    out: str
    err: str


_FRESH = ("import sys; from matformer.cli import main; rc = main(sys.argv[1:]); "
          "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
          "print('IMPORTED', bad, file=sys.stderr) if bad else None; sys.exit(rc)")


@pytest.fixture
def run_cli(capsys, monkeypatch) -> Callable[..., CliRun]:
    """Run `matformer ARGV...` and return (code, out, err).

    In this process by default (argparse's own exits become their status; `stdin` feeds the
    verb's standard input). With `fresh=True` in a new interpreter instead, which reports
    `IMPORTED [...]` on stderr if torch or transformers got imported (start-up contract)."""

    def run(*argv: str, stdin: str | None = None, fresh: bool = False) -> CliRun:
        argv = tuple(str(a) for a in argv)
        if fresh:
            r = subprocess.run([sys.executable, "-c", _FRESH, *argv], capture_output=True,
                               text=True, timeout=120, input=stdin)
            return CliRun(r.returncode, r.stdout, r.stderr)
        from matformer.cli import main

        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse's own errors: usage + one line, status 2
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return CliRun(code, out, err)

    return run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small corpus of Python-like files: enough text for a 300-token BPE and a few windows."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        body = "".join(f"def f_{i}_{j}(x, y):\n    return x * {j} + y - {i}\n\n" for j in range(12))
        (d / f"m{i:02d}.py").write_text(f"# module {i}\nimport os\n\n" + body)
    return d


def tiny_config(tmp_path: Path, corpus: Path, **kw) -> TrainConfig:
    """A debug-preset training run on `corpus` that finishes in seconds."""
    base = dict(out=str(tmp_path / "run"), data=str(corpus), preset="debug", steps=24,
                batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, vocab_size=300,
                eval_every=1000, save_every=1000, eval_windows=8, seed=0,
                cache_dir=str(tmp_path.parent / "cache"), quiet=True, val_fraction=0.1)
    base.update(kw)
    return TrainConfig(**base)
