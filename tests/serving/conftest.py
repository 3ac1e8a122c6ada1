"""What the served-checkpoint tests share: a tiny checkpoint with its tokenizer, one torch
thread while a module's server runs, and the `openai` client of a module's `served` fixture
(whose first item is the running server)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from matformer.data.text import save_tokenizer, train_tokenizer
from matformer.io.checkpoint import save_model
from tests.conftest import tiny_lm


def write_checkpoint(folder: Path, texts: int, **model: Any) -> Any:
    """conftest's tiny_lm (seed 0, `model` its options) and a 512-token BPE tokenizer trained
    on `texts` lines, saved to `folder`; returns the tokenizer."""
    tok = train_tokenizer([f"the quick brown fox {i} jumps over the lazy dog {i * 7}"
                           for i in range(texts)], 512)
    save_model(tiny_lm(0, **model), folder)
    save_tokenizer(tok, folder)
    return tok


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread (the server's engine and the reference model share the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)
