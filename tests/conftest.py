"""Shared test helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from matformer import MatFormerConfig, MatFormerLM
from matformer.training import TrainConfig


@pytest.fixture
def one_thread():
    """Tiny matmuls: extra threads only add contention on a shared 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def distinct_widths_model(seed: int = 0, **overrides) -> MatFormerLM:
    """A debug-preset model whose widths visibly disagree: at random init the FFN is a small
    correction, so scale it (and the head) up; drafts then get rejected and widths differ."""
    torch.manual_seed(seed)
    model = MatFormerLM(MatFormerConfig.from_preset("debug", **overrides)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(8)
        model.lm_head.weight.mul_(4)
    return model


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
