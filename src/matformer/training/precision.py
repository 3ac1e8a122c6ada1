"""Mixed precision: autocast compute with float32 master weights, and loss scaling for float16.

`--dtype bfloat16|float16` runs the forward (and so the backward) under `torch.autocast`: matmuls
in the low dtype, reductions (RMSNorm, softmax, the loss) in float32. Parameters, gradients and
NestedAdamW's moments stay float32, so the update is the float32 one.

float16's narrow range needs loss scaling. `LossScaler` is the usual dynamic scheme (as
torch.amp.GradScaler: scale 2^16, halve and skip the step on an overflow, double after 2000
clean steps); our own because the overflow test is the global gradient norm the step computes
anyway for clipping, which under FSDP2 is already reduced over every rank's shard — every rank
skips the same steps without a second collective — and the skip must also leave NestedAdamW's
per-neuron step counts alone (a GradScaler-skipped `step(extent)` never reaches it either).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch

from matformer.errors import CheckpointError
from matformer.io.metadata import Fields


def compute_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's precision context: nothing for float32, torch.autocast otherwise."""
    if name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype(name))


class LossScaler:
    """Dynamic loss scaling (float16), a no-op scale of 1 otherwise."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.clean_steps = 0

    def unscale_(self, grads: Iterable[torch.Tensor]) -> None:
        if self.enabled:
            grads = [g for g in grads if g is not None]
            if grads:
                torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, grad_norm: float) -> bool:
        """Record a step whose (unscaled) global gradient norm is `grad_norm`; True: take the
        optimizer step, False: skip it (an overflow, the scale was halved)."""
        if not self.enabled:
            return True
        if not math.isfinite(grad_norm):
            self.scale /= 2.0
            self.clean_steps = 0
            return False
        self.clean_steps += 1
        if self.clean_steps % self.growth_interval == 0:
            self.scale *= 2.0
        return True

    def state(self) -> dict[str, float]:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state(self, state: dict[str, float]) -> None:
        if self.enabled and state:
            # a saved loss scale is checked like every training-state field (io.metadata)
            f = Fields(state, "training state: extra.loss_scale", CheckpointError)
            self.scale = f.number("scale", lo=2.0**-64, hi=2.0**64)
            self.clean_steps = f.integer("clean_steps", lo=0)
