"""`Qwen2Config`: a Llama-block config with q/k/v biases (Qwen2, Qwen2.5).

transformers' `Qwen2ForCausalLM` differs from Llama in two places: q_proj, k_proj and v_proj
always carry biases (o_proj none), and with `use_sliding_window` the layers `layer_types` marks
'sliding_attention' attend through `sliding_window`. The biases nest with their rows: a cut to
g KV groups keeps bias rows [:g*r*hd] of q and [:g*hd] of k/v (`models.lm.shapes`). GGUF: llama.cpp's
`qwen2` architecture (NEOX rope: no row permutation; `blk.N.attn_q.bias`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.numerics import Dialect

MODEL_TYPE = "qwen2"
ARCHITECTURE = "Qwen2ForCausalLM"
NESTED_ARCHITECTURE = "MatFormerQwen2ForCausalLM"


@dataclass
class Qwen2Config(MatFormerConfig):
    MODEL_TYPE: ClassVar[str] = MODEL_TYPE
    ARCHITECTURE: ClassVar[str] = ARCHITECTURE
    NESTED_ARCHITECTURE: ClassVar[str] = NESTED_ARCHITECTURE
    DIALECT: ClassVar[Dialect] = Dialect(model_types=(MODEL_TYPE,), sliding="layer_types",
                                         bias="qkv")
    GGUF_ARCH: ClassVar[str] = "qwen2"
