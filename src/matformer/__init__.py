"""matformer: elastic nested (MatFormer) transformers.

Train one Llama-compatible model whose FFNs are nested; run or extract any width of it.
Imports are lazy so that `import matformer` (and the CLI's start-up) stays cheap. No submodule is
named like a public name (`generation`, `evaluation`, `training` hold `generate`, `evaluate`,
`train`): importing a submodule sets the package attribute of its name, which would replace the
function; tests/contracts/test_layout.py checks every import order.
"""

from __future__ import annotations

import importlib
from typing import Any

from matformer import hf as _hf

__version__ = "0.1.0"

# transformers' Auto classes learn matformer's checkpoints when transformers loads them, not now
# (neither torch nor transformers is imported here: matformer.hf).
_hf.install()

# public name -> module that defines it
_EXPORTS = {
    "MatFormerConfig": "matformer.models.lm.config",
    "PRESETS": "matformer.models.lm.config",
    "MatFormerLM": "matformer.models.lm.model",
    "KVCache": "matformer.models.lm.model",
    "MatViT": "matformer.models.vit.model",
    "MatViTConfig": "matformer.models.vit.config",
    "parameter_counts": "matformer.models.lm.shapes",
    "MatFormerError": "matformer.errors",
    "ConfigError": "matformer.errors",
    "TierError": "matformer.errors",
    "CheckpointError": "matformer.errors",
    "DataError": "matformer.errors",
    "width_of": "matformer.tiers",
    "tier_of": "matformer.tiers",
    "resolve_widths": "matformer.tiers",
    "WidthRequest": "matformer.tiers",
    "load_state_dict": "matformer.io.checkpoint",
    "load_model": "matformer.io.checkpoint",
    "save_model": "matformer.io.checkpoint",
    "checkpoint_info": "matformer.io.checkpoint",
    "slice_checkpoint": "matformer.slicing.extract",
    "train": "matformer.training",
    "TrainConfig": "matformer.training",
    "generate": "matformer.inference.decode",
    "generate_batch": "matformer.inference.decode",
    "speculative_generate": "matformer.inference.speculative",
    "evaluate": "matformer.evaluation.lm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'matformer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
