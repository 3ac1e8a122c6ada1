"""Shared test helpers."""

from __future__ import annotations

import pytest
import torch

from matformer import MatFormerConfig, MatFormerLM


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
