"""`MistralConfig`: a Llama-block config whose `sliding_window` masks every layer.

transformers' `MistralForCausalLM` is Llama's computation with one difference: when
`sliding_window` is set, query i attends to keys j with i - window < j <= i in every layer
(its attention has no biases). Everything else (nesting, shapes, the model) is the LM's; the
registry entry (`models.registry.MISTRAL`) names this class. llama.cpp's converter writes a
Mistral as its `llama` architecture, which has no window: `matformer export` writes the
window as the context length so llama.cpp never runs past it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.numerics import Dialect

MODEL_TYPE = "mistral"
ARCHITECTURE = "MistralForCausalLM"
NESTED_ARCHITECTURE = "MatFormerMistralForCausalLM"


@dataclass
class MistralConfig(MatFormerConfig):
    MODEL_TYPE: ClassVar[str] = MODEL_TYPE
    ARCHITECTURE: ClassVar[str] = ARCHITECTURE
    NESTED_ARCHITECTURE: ClassVar[str] = NESTED_ARCHITECTURE
    DIALECT: ClassVar[Dialect] = Dialect(model_types=(MODEL_TYPE,), sliding="all", bias="none")
    GGUF_ARCH: ClassVar[str] = "llama"
