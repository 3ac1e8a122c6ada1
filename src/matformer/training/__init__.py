"""Training every width of a MatFormer at once: `train(TrainConfig(...)) -> TrainResult`.

One concern per module:
- `settings`: `TrainConfig` (every setting, its CLI flag generated from the field), validation,
  which tiers each rank trains. Torch-free.
- `optimizer`: `NestedAdamW` (AdamW on the used prefix of each nested FFN) and the lr schedule.
- `objective`: a step's plan of (tier, weight) per rank and `forward_backward`.
- `distributed`: processes and devices (torchrun / DDP; one code path for 1 and N processes).
- `state`: checkpoints, rotation, save and bit-exact resume.
- `evaluation`: the held-out windows and their per-tier loss during training.
- `report`: log lines and train_log.jsonl.
- `prepare`: builds a `Run` (data, tokenizer, model, optimizer, restored state).
- `loop`: `train()`, the loop itself.

The package is named `training` (not `train`) so that `matformer.train` stays the function
whatever was imported first. Imports are lazy: `TrainConfig` (for `matformer train --help`) does
not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from matformer.training.settings import TrainConfig, model_config, validate

_LAZY = {
    "train": "loop", "TrainResult": "loop",
    "NestedAdamW": "optimizer", "lr_at": "optimizer",
    "Objective": "objective", "forward_backward": "objective", "step_plan": "objective",
    "update_extent": "objective",
    "evaluate_tiers": "evaluation",
    "checkpoints": "state",
}

__all__ = ["TrainConfig", "model_config", "validate", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
