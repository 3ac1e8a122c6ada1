"""`Qwen3Config`: a Llama-block config with per-head q_norm/k_norm (Qwen3).

transformers' `Qwen3ForCausalLM` differs from Llama in that each query and key head is
RMS-normalised over its `head_dim` values (one weight of `head_dim`, shared by every head)
before rope, `head_dim` is its own key (not hidden_size / heads), `attention_bias` gives q/k/v/o
biases, and with `use_sliding_window` `layer_types` gives per-layer windows (as Qwen2). The norm
weights are per head *position*, not per head, so cutting heads keeps them whole: they move
with their heads by being the same for every head. GGUF: llama.cpp's `qwen3` architecture
(`blk.N.attn_q_norm`, `blk.N.attn_k_norm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.numerics import Dialect

MODEL_TYPE = "qwen3"
ARCHITECTURE = "Qwen3ForCausalLM"
NESTED_ARCHITECTURE = "MatFormerQwen3ForCausalLM"


@dataclass
class Qwen3Config(MatFormerConfig):
    MODEL_TYPE: ClassVar[str] = MODEL_TYPE
    ARCHITECTURE: ClassVar[str] = ARCHITECTURE
    NESTED_ARCHITECTURE: ClassVar[str] = NESTED_ARCHITECTURE
    DIALECT: ClassVar[Dialect] = Dialect(model_types=(MODEL_TYPE,), sliding="layer_types",
                                         bias="config", qk_norm=True)
    GGUF_ARCH: ClassVar[str] = "qwen3"
